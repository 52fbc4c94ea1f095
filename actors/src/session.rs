//! Chat sessions that keep their conversation across turns: a `SessionSupervisor` per
//! node and, under it, a `SessionActor` per live session (named
//! `maas.session.<node>.<session id>`, one per session on a node).
//!
//! The actor owns the conversation: it loads the session and its messages from the store
//! when it starts (so a session survives a node restart and can be resumed on any node
//! that shares the database), reads the messages again before each turn (a client that
//! reconnected to another node may have taken turns there meanwhile), hands out the messages to render for a new user turn,
//! refuses a second turn while one is answering, and writes the user's message and the
//! assistant's reply to SQL together when the reply ends (a cancelled or failed reply is
//! recorded with what was produced, marked by its finish reason). It stops after
//! `idle_timeout` without messages. The generation itself runs in the gateway; the
//! actor only holds and persists state. The rules are in [`Conversation`], a plain
//! struct; the actors only dispatch.
//!
//! **Restart policy:** a session actor that fails is started again at once from the
//! store (its turn in progress, if any, is lost and reported to its client), at most
//! `max_restarts` times per `restart_window` (5 in 60 s by default); past that the session
//! reports failed on this node until its failures fall out of the window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use maas_engine::ChatMessage;
use maas_store::repo::sessions::{ChatSession, MessageRole, NewSessionMessage, SessionMessage};
use maas_store::{Db, StoreError, TenantScope};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;
use serde::Serialize;

/// How long a caller waits for a session actor's answer before reporting it unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session `{session_id}` is still answering the previous turn; wait for its `done` frame or send `cancel`")]
    Busy { session_id: String },
    #[error("session `{session_id}` not found")]
    NotFound { session_id: String },
    #[error("turn {turn_id} is not the turn in progress of session `{session_id}`")]
    StaleTurn { session_id: String, turn_id: u64 },
    #[error("session `{session_id}` failed {failures} times within {window:?} and stays down until then: {reason}")]
    Failed { session_id: String, failures: usize, window: Duration, reason: String },
    #[error("session `{session_id}` is unavailable: {reason}; retry shortly")]
    Unavailable { session_id: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a turn's reply ended, as stored and as sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnFinish {
    Stop,
    Length,
    Cancelled,
    Failed,
    /// A safety rule's output filter ended the reply.
    ContentFilter,
}

impl TurnFinish {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnFinish::Stop => "stop",
            TurnFinish::Length => "length",
            TurnFinish::Cancelled => "cancelled",
            TurnFinish::Failed => "failed",
            TurnFinish::ContentFilter => "content_filter",
        }
    }
}

/// What became of a turn's generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnOutcome {
    /// The generation never started (the request was refused): nothing is recorded.
    Rejected,
    /// The reply ended; both messages are recorded.
    Replied {
        content: String,
        finish: TurnFinish,
        /// Why a failed reply failed.
        error: Option<String>,
        /// Unknown when the turn was cut before the replica reported it.
        prompt_tokens: Option<usize>,
        completion_tokens: usize,
    },
}

/// A turn handed out by [`Conversation::begin_turn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnStart {
    pub turn_id: u64,
    /// The system prompt, the history and the new user message, to render.
    pub messages: Vec<ChatMessage>,
}

/// A session as it stands: the stored session and messages, and whether a turn is
/// answering.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionSnapshot {
    pub session: ChatSession,
    pub messages: Vec<SessionMessage>,
    pub busy: bool,
}

/// The user message of the turn in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingTurn {
    id: u64,
    content: String,
}

/// The conversation's rules, without a runtime: what to render, one turn at a time, and
/// what to record when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    session: ChatSession,
    messages: Vec<SessionMessage>,
    pending: Option<PendingTurn>,
    next_turn_id: u64,
}

impl Conversation {
    pub fn new(session: ChatSession, messages: Vec<SessionMessage>) -> Self {
        Conversation { session, messages, pending: None, next_turn_id: 1 }
    }

    pub fn session(&self) -> &ChatSession {
        &self.session
    }

    pub fn messages(&self) -> &[SessionMessage] {
        &self.messages
    }

    pub fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Takes the stored messages as they are now (turns taken through another node's actor
    /// included); ignored while a turn is answering, whose messages are not stored yet.
    pub fn refresh(&mut self, messages: Vec<SessionMessage>) {
        if self.pending.is_none() {
            self.messages = messages;
        }
    }

    pub fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot { session: self.session.clone(), messages: self.messages.clone(), busy: self.busy() }
    }

    /// Starts a turn for `content`, or refuses while one is answering (changing nothing).
    /// The history sent to the model is the system prompt and every stored message with
    /// content (a reply cut before its first token adds nothing).
    pub fn begin_turn(&mut self, content: String) -> Result<TurnStart, SessionError> {
        if self.pending.is_some() {
            return Err(SessionError::Busy { session_id: self.session.id.clone() });
        }
        let mut messages = Vec::with_capacity(self.messages.len() + 2);
        if let Some(system) = self.session.system_prompt.as_deref().filter(|s| !s.is_empty()) {
            messages.push(ChatMessage::new("system", system));
        }
        messages.extend(
            self.messages
                .iter()
                .filter(|m| !m.content.is_empty())
                .map(|m| ChatMessage::new(m.role.as_str(), m.content.clone())),
        );
        messages.push(ChatMessage::new("user", content.clone()));
        let turn_id = self.next_turn_id;
        self.next_turn_id += 1;
        self.pending = Some(PendingTurn { id: turn_id, content });
        Ok(TurnStart { turn_id, messages })
    }

    /// The rows that record turn `turn_id` with `outcome`: none for a rejected turn, the
    /// user's message and the reply otherwise. Refuses a turn that is not in progress.
    pub fn rows_for(&self, turn_id: u64, outcome: &TurnOutcome) -> Result<Vec<NewSessionMessage>, SessionError> {
        let Some(pending) = self.pending.as_ref().filter(|p| p.id == turn_id) else {
            return Err(SessionError::StaleTurn { session_id: self.session.id.clone(), turn_id });
        };
        let TurnOutcome::Replied { content, finish, error, prompt_tokens, completion_tokens } = outcome else {
            return Ok(Vec::new());
        };
        let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        Ok(vec![
            NewSessionMessage {
                role: MessageRole::User,
                content: pending.content.clone(),
                finish_reason: None,
                error: None,
                prompt_tokens: None,
                completion_tokens: None,
            },
            NewSessionMessage {
                role: MessageRole::Assistant,
                content: content.clone(),
                finish_reason: Some(finish.as_str().to_owned()),
                error: error.clone(),
                prompt_tokens: prompt_tokens.map(to_i64),
                completion_tokens: Some(to_i64(*completion_tokens)),
            },
        ])
    }

    /// Ends the turn in progress with the messages the store recorded for it (none when
    /// it was rejected or could not be written).
    pub fn end_turn(&mut self, stored: Vec<SessionMessage>) {
        self.pending = None;
        self.messages.extend(stored);
    }
}

/// Settings of the session actors of a node.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub node_id: u64,
    /// A session actor stops after this long without a message (`gateway.session_idle_secs`).
    pub idle_timeout: Duration,
    pub max_restarts: usize,
    pub restart_window: Duration,
}

impl SessionConfig {
    pub fn new(node_id: u64, idle_timeout: Duration) -> Self {
        SessionConfig { node_id, idle_timeout, max_restarts: 5, restart_window: Duration::from_secs(60) }
    }
}

/// The registered name of a session's actor on `node_id`. Node ids keep names unique
/// across the cluster (see ARCHITECTURE.md's rule on remotable names).
pub fn session_actor_name(node_id: u64, session_id: &str) -> String {
    format!("maas.session.{node_id}.{session_id}")
}

/// A session actor, as callers hold it.
pub type SessionRef = ActorRef<SessionMsg>;

#[derive(RactorMessage)]
pub enum SessionMsg {
    Snapshot(RpcReplyPort<SessionSnapshot>),
    BeginTurn {
        content: String,
        reply: RpcReplyPort<Result<TurnStart, SessionError>>,
    },
    /// Records the turn (written by `scope`, the caller of the turn) and ends it.
    FinishTurn {
        scope: TenantScope,
        turn_id: u64,
        outcome: TurnOutcome,
        reply: Option<RpcReplyPort<Result<Vec<SessionMessage>, SessionError>>>,
    },
    /// Stops the actor when nothing happened since activity `epoch` and no turn answers.
    IdleCheck(u64),
    /// Fails the actor, for the restart policy's tests.
    #[cfg(test)]
    Crash,
}

pub struct SessionActor;

pub struct SessionActorArgs {
    pub db: Db,
    pub scope: TenantScope,
    pub session_id: String,
    pub idle_timeout: Duration,
}

pub struct SessionActorState {
    db: Db,
    /// Whose session it is, as it was opened: the messages are read again with it.
    scope: TenantScope,
    conversation: Conversation,
    idle_timeout: Duration,
    /// Counts messages, so an idle check knows whether anything happened since it was set.
    activity: u64,
}

impl SessionActorState {
    fn touch(&mut self, myself: &ActorRef<SessionMsg>) {
        self.activity += 1;
        let epoch = self.activity;
        myself.send_after(self.idle_timeout, move || SessionMsg::IdleCheck(epoch));
    }
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionActorState;
    type Arguments = SessionActorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionActorArgs,
    ) -> Result<SessionActorState, ActorProcessingErr> {
        let session = args.db.sessions().get(&args.scope, &args.session_id).await?;
        let messages = args.db.sessions().messages(&args.scope, &args.session_id).await?;
        tracing::debug!(session = %args.session_id, messages = messages.len(), "session loaded");
        let mut state = SessionActorState {
            db: args.db,
            scope: args.scope,
            conversation: Conversation::new(session, messages),
            idle_timeout: args.idle_timeout,
            activity: 0,
        };
        state.touch(&myself);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        message: SessionMsg,
        state: &mut SessionActorState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(message, SessionMsg::IdleCheck(_)) {
            state.touch(&myself);
        }
        match message {
            SessionMsg::Snapshot(reply) => {
                let _ = reply.send(state.conversation.snapshot());
            }
            SessionMsg::BeginTurn { content, reply } => {
                if !state.conversation.busy() {
                    let session_id = state.conversation.session.id.clone();
                    match state.db.sessions().messages(&state.scope, &session_id).await {
                        Ok(messages) => state.conversation.refresh(messages),
                        Err(err) => {
                            // The turn goes on with the history this actor holds.
                            tracing::warn!(session = %session_id, error = %err, "cannot read the session's messages again");
                        }
                    }
                }
                let _ = reply.send(state.conversation.begin_turn(content));
            }
            SessionMsg::FinishTurn { scope, turn_id, outcome, reply } => {
                let result = state.finish_turn(&scope, turn_id, &outcome).await;
                if let Err(err) = &result {
                    tracing::warn!(session = %state.conversation.session.id, turn_id, error = %err, "a turn was not recorded");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            SessionMsg::IdleCheck(epoch) => {
                if epoch == state.activity && !state.conversation.busy() {
                    myself.stop(Some("idle".into()));
                }
            }
            #[cfg(test)]
            SessionMsg::Crash => return Err("crash requested".into()),
        }
        Ok(())
    }
}

impl SessionActorState {
    /// Writes the turn's messages (both in one transaction) and ends the turn. A turn
    /// that cannot be written ends with nothing added, as the store kept nothing.
    async fn finish_turn(
        &mut self,
        scope: &TenantScope,
        turn_id: u64,
        outcome: &TurnOutcome,
    ) -> Result<Vec<SessionMessage>, SessionError> {
        let rows = self.conversation.rows_for(turn_id, outcome)?;
        if rows.is_empty() {
            self.conversation.end_turn(Vec::new());
            return Ok(Vec::new());
        }
        match self.db.sessions().append(scope, &self.conversation.session.id, rows).await {
            Ok(stored) => {
                self.conversation.end_turn(stored.clone());
                Ok(stored)
            }
            Err(err) => {
                self.conversation.end_turn(Vec::new());
                Err(err.into())
            }
        }
    }
}

/// The gateway's handle on this node's sessions.
#[derive(Clone)]
pub struct Sessions {
    supervisor: ActorRef<SupervisorMsg>,
}

impl Sessions {
    /// Starts the node's session supervisor.
    pub async fn start(db: Db, config: SessionConfig) -> crate::Result<Self> {
        let (supervisor, _) = Actor::spawn(None, SessionSupervisor, (db, config))
            .await
            .map_err(|e| crate::ActorsError::Spawn { actor: "session supervisor", reason: e.to_string() })?;
        Ok(Sessions { supervisor })
    }

    pub fn supervisor(&self) -> &ActorRef<SupervisorMsg> {
        &self.supervisor
    }

    pub fn stop(&self) {
        self.supervisor.stop(None);
    }

    /// The live actor of `session_id` on this node, started (its history loaded as
    /// `scope` may read it) if none runs.
    pub async fn open(&self, scope: &TenantScope, session_id: &str) -> Result<ActorRef<SessionMsg>, SessionError> {
        let outcome = self
            .supervisor
            .call(
                |reply| SupervisorMsg::Open { scope: scope.clone(), session_id: session_id.to_owned(), reply },
                Some(CALL_TIMEOUT),
            )
            .await;
        flatten(session_id, outcome)?
    }

    /// Stops `session_id`'s actor on this node, if one runs (the session was deleted).
    pub fn close(&self, session_id: &str) {
        let _ = self.supervisor.cast(SupervisorMsg::Close { session_id: session_id.to_owned() });
    }

    /// The sessions with a live actor on this node.
    pub async fn live(&self) -> Vec<String> {
        match self.supervisor.call(SupervisorMsg::Live, Some(CALL_TIMEOUT)).await {
            Ok(CallResult::Success(live)) => live,
            _ => Vec::new(),
        }
    }

    /// Starts a turn on the session's actor. An actor that stopped meanwhile (idle, or
    /// failed and restarted) is opened again once.
    pub async fn begin_turn(
        &self,
        scope: &TenantScope,
        session_id: &str,
        content: &str,
    ) -> Result<(ActorRef<SessionMsg>, TurnStart), SessionError> {
        let mut last = None;
        for _attempt in 0..2 {
            let actor = self.open(scope, session_id).await?;
            let outcome = actor
                .call(|reply| SessionMsg::BeginTurn { content: content.to_owned(), reply }, Some(CALL_TIMEOUT))
                .await;
            match flatten(session_id, outcome) {
                Ok(Ok(start)) => return Ok((actor, start)),
                Ok(Err(err)) => return Err(err),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| SessionError::Unavailable {
            session_id: session_id.to_owned(),
            reason: "its actor stopped".into(),
        }))
    }

    /// The session as its live actor holds it.
    pub async fn snapshot(&self, scope: &TenantScope, session_id: &str) -> Result<SessionSnapshot, SessionError> {
        let actor = self.open(scope, session_id).await?;
        flatten(session_id, actor.call(SessionMsg::Snapshot, Some(CALL_TIMEOUT)).await)
    }
}

/// Records turn `turn_id` on `actor` and waits until it is written.
pub async fn finish_turn(
    actor: &ActorRef<SessionMsg>,
    scope: &TenantScope,
    session_id: &str,
    turn_id: u64,
    outcome: TurnOutcome,
) -> Result<Vec<SessionMessage>, SessionError> {
    let outcome = actor
        .call(
            |reply| SessionMsg::FinishTurn { scope: scope.clone(), turn_id, outcome, reply: Some(reply) },
            Some(CALL_TIMEOUT),
        )
        .await;
    flatten(session_id, outcome)?
}

fn flatten<T, M>(session_id: &str, outcome: Result<CallResult<T>, ractor::MessagingErr<M>>) -> Result<T, SessionError> {
    let reason = match outcome {
        Ok(CallResult::Success(value)) => return Ok(value),
        Ok(CallResult::Timeout) => format!("no answer within {CALL_TIMEOUT:?}"),
        Ok(CallResult::SenderError) | Err(_) => "its actor stopped".to_owned(),
    };
    Err(SessionError::Unavailable { session_id: session_id.to_owned(), reason })
}

#[derive(RactorMessage)]
pub enum SupervisorMsg {
    Open { scope: TenantScope, session_id: String, reply: RpcReplyPort<Result<ActorRef<SessionMsg>, SessionError>> },
    Close { session_id: String },
    Live(RpcReplyPort<Vec<String>>),
}

/// Supervises the node's session actors (see the module's restart policy).
pub struct SessionSupervisor;

struct LiveSession {
    actor: ActorRef<SessionMsg>,
    /// Who opened it: a restart reloads the session as this scope.
    scope: TenantScope,
}

pub struct SupervisorState {
    db: Db,
    config: SessionConfig,
    live: HashMap<String, LiveSession>,
    by_actor: HashMap<ActorId, String>,
    /// Failures of each session's actor within the restart window.
    failures: HashMap<String, (Vec<Instant>, String)>,
}

impl Actor for SessionSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = (Db, SessionConfig);

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        (db, config): (Db, SessionConfig),
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState { db, config, live: HashMap::new(), by_actor: HashMap::new(), failures: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Open { scope, session_id, reply } => {
                let _ = reply.send(state.open(&myself, scope, &session_id).await);
            }
            SupervisorMsg::Close { session_id } => {
                if let Some(live) = state.live.remove(&session_id) {
                    state.by_actor.remove(&live.actor.get_id());
                    live.actor.stop(Some("the session was deleted".into()));
                }
            }
            SupervisorMsg::Live(reply) => {
                let mut live: Vec<String> = state
                    .live
                    .iter()
                    .filter(|(_, l)| l.actor.get_status() < ActorStatus::Stopping)
                    .map(|(id, _)| id.clone())
                    .collect();
                live.sort();
                let _ = reply.send(live);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let Some(session_id) = state.by_actor.remove(&cell.get_id()) else { return Ok(()) };
        let Some(live) = state.live.remove(&session_id) else { return Ok(()) };
        let Some(reason) = failure else {
            tracing::debug!(session = %session_id, "session actor stopped");
            return Ok(());
        };
        if let Some(refusal) = state.budget_spent(&session_id, Some(reason.clone())) {
            tracing::error!(session = %session_id, "{refusal}");
            return Ok(());
        }
        tracing::error!(session = %session_id, error = %reason, "session actor failed; restarting it from the store");
        if let Err(err) = state.spawn(&myself, live.scope, &session_id).await {
            tracing::error!(session = %session_id, error = %err, "cannot restart a session actor");
        }
        Ok(())
    }
}

impl SupervisorState {
    async fn open(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        scope: TenantScope,
        session_id: &str,
    ) -> Result<ActorRef<SessionMsg>, SessionError> {
        if let Some(live) = self.live.get(session_id) {
            if live.actor.get_status() < ActorStatus::Stopping {
                return Ok(live.actor.clone());
            }
            // Stopping (idle): its name is already free, so a fresh actor can start.
            let stale = self.live.remove(session_id).map(|l| l.actor.get_id());
            if let Some(id) = stale {
                self.by_actor.remove(&id);
            }
        }
        if let Some(refusal) = self.budget_spent(session_id, None) {
            return Err(refusal);
        }
        self.spawn(myself, scope, session_id).await
    }

    /// Counts a failure (when `failure` is given) and says whether the session's restart
    /// budget is spent.
    fn budget_spent(&mut self, session_id: &str, failure: Option<String>) -> Option<SessionError> {
        let now = Instant::now();
        let window = self.config.restart_window;
        let entry = self.failures.entry(session_id.to_owned()).or_default();
        entry.0.retain(|at| now.duration_since(*at) < window);
        if let Some(reason) = failure {
            entry.0.push(now);
            entry.1 = reason;
        }
        let failures = entry.0.len();
        if failures == 0 {
            self.failures.remove(session_id);
            return None;
        }
        (failures > self.config.max_restarts).then(|| SessionError::Failed {
            session_id: session_id.to_owned(),
            failures,
            window,
            reason: entry.1.clone(),
        })
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        scope: TenantScope,
        session_id: &str,
    ) -> Result<ActorRef<SessionMsg>, SessionError> {
        let name = session_actor_name(self.config.node_id, session_id);
        let args = SessionActorArgs {
            db: self.db.clone(),
            scope: scope.clone(),
            session_id: session_id.to_owned(),
            idle_timeout: self.config.idle_timeout,
        };
        match Actor::spawn_linked(Some(name), SessionActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.by_actor.insert(actor.get_id(), session_id.to_owned());
                self.live.insert(session_id.to_owned(), LiveSession { actor: actor.clone(), scope });
                Ok(actor)
            }
            Err(ractor::SpawnErr::StartupFailed(err)) => Err(match err.downcast::<StoreError>() {
                Ok(store) => match *store {
                    StoreError::NotFound { .. } => SessionError::NotFound { session_id: session_id.to_owned() },
                    other => SessionError::Store(other),
                },
                Err(other) => {
                    SessionError::Unavailable { session_id: session_id.to_owned(), reason: other.to_string() }
                }
            }),
            Err(other) => {
                Err(SessionError::Unavailable { session_id: session_id.to_owned(), reason: other.to_string() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use maas_store::Owner;
    use serde_json::json;

    use super::*;

    fn session(system_prompt: Option<&str>) -> ChatSession {
        ChatSession {
            id: "sess-1".into(),
            owner: Owner::User("user-1".into()),
            model: "chat".into(),
            system_prompt: system_prompt.map(str::to_owned),
            sampling: json!({}),
            title: None,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn stored(seq: i64, rows: Vec<NewSessionMessage>) -> Vec<SessionMessage> {
        rows.into_iter()
            .zip(seq..)
            .map(|(row, seq)| SessionMessage {
                seq,
                role: row.role,
                content: row.content,
                finish_reason: row.finish_reason,
                error: row.error,
                prompt_tokens: row.prompt_tokens,
                completion_tokens: row.completion_tokens,
                created_at_ms: 0,
            })
            .collect()
    }

    fn replied(content: &str, finish: TurnFinish) -> TurnOutcome {
        TurnOutcome::Replied {
            content: content.into(),
            finish,
            error: None,
            prompt_tokens: Some(10),
            completion_tokens: 2,
        }
    }

    fn roles(messages: &[ChatMessage]) -> Vec<(&str, &str)> {
        messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect()
    }

    #[test]
    fn turns_render_the_history_one_at_a_time() {
        let mut conversation = Conversation::new(session(Some("be brief")), Vec::new());
        let first = conversation.begin_turn("hello".into()).unwrap();
        assert_eq!(roles(&first.messages), [("system", "be brief"), ("user", "hello")]);

        // A second turn while the first answers is refused and changes nothing.
        let before = conversation.clone();
        assert!(matches!(conversation.begin_turn("again".into()), Err(SessionError::Busy { .. })));
        assert_eq!(conversation, before);

        let rows = conversation.rows_for(first.turn_id, &replied("hi there", TurnFinish::Stop)).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].role, rows[0].content.as_str()), (MessageRole::User, "hello"));
        assert_eq!(rows[1].finish_reason.as_deref(), Some("stop"));
        conversation.end_turn(stored(1, rows));

        let second = conversation.begin_turn("and then?".into()).unwrap();
        assert_eq!(
            roles(&second.messages),
            [("system", "be brief"), ("user", "hello"), ("assistant", "hi there"), ("user", "and then?")]
        );
        assert_ne!(second.turn_id, first.turn_id);
    }

    #[test]
    fn cut_replies_are_recorded_marked_and_rejected_turns_are_not_recorded() {
        let mut conversation = Conversation::new(session(None), Vec::new());
        let rejected = conversation.begin_turn("too long".into()).unwrap();
        assert!(conversation.rows_for(rejected.turn_id, &TurnOutcome::Rejected).unwrap().is_empty());
        conversation.end_turn(Vec::new());
        assert!(conversation.messages().is_empty() && !conversation.busy());

        let cancelled = conversation.begin_turn("tell me a story".into()).unwrap();
        assert!(matches!(
            conversation.rows_for(cancelled.turn_id + 1, &TurnOutcome::Rejected),
            Err(SessionError::StaleTurn { .. })
        ));
        let rows = conversation.rows_for(cancelled.turn_id, &replied("", TurnFinish::Cancelled)).unwrap();
        assert_eq!(rows[1].finish_reason.as_deref(), Some("cancelled"));
        conversation.end_turn(stored(1, rows));
        assert_eq!(conversation.messages().len(), 2);

        // An empty, cut reply is kept in the record but not sent to the model again.
        let next = conversation.begin_turn("go on".into()).unwrap();
        assert_eq!(roles(&next.messages), [("user", "tell me a story"), ("user", "go on")]);
    }

    async fn store() -> (tempfile::TempDir, Db, TenantScope, ChatSession) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&maas_store::DbOptions::new(maas_store::db::sqlite_url_in(dir.path()))).await.unwrap();
        db.migrate().await.unwrap();
        let user_id = db.users().ensure_local().await.unwrap();
        let scope = TenantScope::resolve(&db, &user_id, None).await.unwrap();
        let new = maas_store::repo::sessions::NewChatSession {
            model: "chat".into(),
            system_prompt: Some("be brief".into()),
            sampling: json!({}),
            title: None,
        };
        let session = db.sessions().create(&scope, new).await.unwrap();
        (dir, db, scope, session)
    }

    #[tokio::test]
    async fn a_session_actor_persists_turns_and_a_new_one_resumes_them() {
        let (_dir, db, scope, session) = store().await;
        let sessions = Sessions::start(db.clone(), SessionConfig::new(1, Duration::from_secs(600))).await.unwrap();
        let (actor, first) = sessions.begin_turn(&scope, &session.id, "hello").await.unwrap();
        assert_eq!(actor.get_name().as_deref(), Some(session_actor_name(1, &session.id).as_str()));
        let busy = sessions.begin_turn(&scope, &session.id, "again").await;
        assert!(matches!(busy, Err(SessionError::Busy { .. })), "one turn at a time");
        assert!(db.sessions().messages(&scope, &session.id).await.unwrap().is_empty(), "written when the reply ends");
        let stored =
            finish_turn(&actor, &scope, &session.id, first.turn_id, replied("hi", TurnFinish::Stop)).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(db.sessions().messages(&scope, &session.id).await.unwrap(), stored);

        // Another node (another supervisor over the same database) resumes the history.
        let elsewhere = Sessions::start(db.clone(), SessionConfig::new(2, Duration::from_secs(600))).await.unwrap();
        let (there, next) = elsewhere.begin_turn(&scope, &session.id, "more").await.unwrap();
        assert_eq!(next.messages.len(), 4, "system, the first turn and the new message: {:?}", next.messages);
        finish_turn(&there, &scope, &session.id, next.turn_id, replied("sure", TurnFinish::Stop)).await.unwrap();

        // Back on the first node, whose actor is still live: the turn taken elsewhere is
        // part of the history it sends.
        let (_, back) = sessions.begin_turn(&scope, &session.id, "and then").await.unwrap();
        let contents: Vec<&str> = back.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, ["be brief", "hello", "hi", "more", "sure", "and then"]);

        let missing = sessions.open(&scope, "sess-missing").await;
        assert!(matches!(missing, Err(SessionError::NotFound { .. })));
        sessions.stop();
        elsewhere.stop();
    }

    #[tokio::test]
    async fn an_idle_session_actor_stops() {
        let (_dir, db, scope, session) = store().await;
        let sessions = Sessions::start(db, SessionConfig::new(1, Duration::from_millis(200))).await.unwrap();
        let actor = sessions.open(&scope, &session.id).await.unwrap();
        actor.wait(Some(Duration::from_secs(10))).await.expect("the idle actor stops");
        let again = sessions.open(&scope, &session.id).await.unwrap();
        assert_ne!(again.get_id(), actor.get_id(), "a later use starts a fresh actor");
        sessions.stop();
    }

    #[tokio::test]
    async fn a_failed_session_actor_restarts_until_its_budget_is_spent() {
        let (_dir, db, scope, session) = store().await;
        let mut config = SessionConfig::new(1, Duration::from_secs(600));
        config.max_restarts = 2;
        let sessions = Sessions::start(db, config).await.unwrap();
        let mut actor = sessions.open(&scope, &session.id).await.unwrap();
        for _ in 0..2 {
            actor.cast(SessionMsg::Crash).unwrap();
            actor.wait(Some(Duration::from_secs(10))).await.unwrap();
            let restarted = sessions.open(&scope, &session.id).await.unwrap();
            assert_ne!(restarted.get_id(), actor.get_id());
            actor = restarted;
        }
        actor.cast(SessionMsg::Crash).unwrap();
        actor.wait(Some(Duration::from_secs(10))).await.unwrap();
        let refused = sessions.open(&scope, &session.id).await;
        assert!(matches!(refused, Err(SessionError::Failed { failures: 3, .. })), "{refused:?}");
        sessions.stop();
    }
}
