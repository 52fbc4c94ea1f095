//! Chat sessions: conversations that keep their messages across turns, for the caller's
//! tenant. `POST /v1/sessions` creates one for a deployment (`model`) with an optional
//! system prompt and sampling settings (checked as chat completions check them);
//! `GET /v1/sessions` lists the caller's, `GET /v1/sessions/{id}` shows one with its
//! messages, `DELETE /v1/sessions/{id}` deletes it; `GET /v1/sessions/{id}/ws` is a
//! WebSocket that chats in it.
//!
//! The conversation is held by the session's actor on this node (`maas_actors::session`):
//! it renders the history for each turn, refuses a second turn while one answers, and
//! writes both messages of a turn to SQL when the reply ends. The generation runs here,
//! through the same routing as `/v1/chat/completions`.
//!
//! # The WebSocket protocol
//!
//! Every frame is a JSON text frame. An unknown or another tenant's session is refused
//! with 404 before the upgrade.
//!
//! Client to server:
//! - `{"type": "user", "content": "...", "max_tokens"?, "temperature"?, "top_p"?, "seed"?}`
//!   starts a turn (the optional fields override the session's settings for this turn);
//! - `{"type": "cancel"}` ends the turn in progress; what was generated so far is kept,
//!   marked `cancelled`.
//!
//! Server to client:
//! - `{"type": "session", "id", "model", "messages": N}` once, on open (`N` messages so far);
//! - per turn, `{"type": "delta", "content": "..."}` frames, then
//!   `{"type": "done", "finish_reason", "usage": {"prompt_tokens", "completion_tokens",
//!   "total_tokens"}, "history_omitted": N}` once the turn is written (`finish_reason`:
//!   `stop`, `length`, `cancelled` or `failed`; a cancelled turn's `prompt_tokens` is 0, as
//!   the replica did not report it; `history_omitted`: the oldest messages left out of
//!   this turn's prompt so that it fits the model's context with `max_tokens` of room for
//!   the answer, see [`maas_engine::fit::trim_history`]: they stay in the session);
//! - `{"type": "error", "error": {"message", "type", "code", "param"}}` for a refused frame
//!   (bad JSON, an unknown `type`, a turn while one answers, an unavailable model, a binary
//!   frame): the socket stays open. A turn that fails while answering gets an error frame
//!   and then its `done` frame with `finish_reason: "failed"`.
//!
//! Pings are answered with pongs. A client that disconnects during a turn cancels its
//! generation, and the turn is recorded as cancelled with what was generated.

use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use maas_actors::session::{self as actor, SessionMsg, SessionRef, Sessions, TurnFinish, TurnOutcome};
use maas_engine::{FinishReason, GenerationEvent};
use maas_store::TenantScope;
use maas_store::repo::sessions::{ChatSession, NewChatSession, SessionMessage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::ws::{Message, WebSocket, Ws};
use warp::{Filter, Reply};

use super::openai::{InferenceRequest, generation, start_generation};
use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::metering::Meter;
use crate::state::AppState;

/// The largest system prompt a session keeps, in bytes.
pub const MAX_SYSTEM_BYTES: usize = 64 * 1024;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let create = warp::path!("v1" / "sessions")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::json_body::<CreateSessionRequest>(1024 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: CreateSessionRequest| async move {
            create_session(&s, &c, request).await.map_err(warp::reject::custom)
        });
    let list = warp::path!("v1" / "sessions")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(
            |s: Arc<AppState>, c: Caller| async move { list_sessions(&s, &c).await.map_err(warp::reject::custom) },
        );
    let get = warp::path!("v1" / "sessions" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            get_session(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    let delete = warp::path!("v1" / "sessions" / String)
        .and(warp::delete())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            delete_session(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    // A plain GET (no upgrade headers) gets a clear 426 instead of warp's header rejection.
    let upgrade = warp::ws().map(Some).or(warp::any().map(|| None::<Ws>)).unify();
    let socket = warp::path!("v1" / "sessions" / String / "ws")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(upgrade)
        .and_then(|id: String, s: Arc<AppState>, c: Caller, ws: Option<Ws>| async move {
            session_socket(s, &c, id, ws).await.map_err(warp::reject::custom)
        });
    create.or(list).unify().or(get).unify().or(delete).unify().or(socket).unify().boxed()
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message).with_param(param)
}

fn sessions(state: &AppState) -> Result<&Sessions, ApiError> {
    state.sessions.get().ok_or_else(|| ApiError::unavailable("the node is starting; retry shortly"))
}

fn db(state: &AppState) -> Result<&maas_store::Db, ApiError> {
    Ok(&state.stores()?.db)
}

/// A session's sampling settings: OpenAI's fields, stored as given and applied to every
/// turn (a turn may override `max_tokens`, `temperature`, `top_p` and `seed`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionSampling {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<super::openai::Stop>,
}

impl SessionSampling {
    /// The chat request these settings make for `model`, checked as
    /// `/v1/chat/completions` checks its fields.
    fn request(&self, model: &str) -> Result<maas_engine::GenerationRequest, ApiError> {
        let mut fields = serde_json::to_value(self).map_err(|e| ApiError::internal(e.to_string()))?;
        fields["model"] = json!(model);
        let request: InferenceRequest =
            serde_json::from_value(fields).map_err(|e| bad("sampling", format!("invalid sampling settings: {e}")))?;
        generation(&request, String::new(), None)
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// The deployment to talk to (as `model` in chat completions).
    pub model: String,
    /// A system prompt placed before every turn's history.
    #[serde(default)]
    pub system: Option<String>,
    /// A title; the first user message's first line when absent.
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<super::openai::Stop>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionObject {
    pub id: String,
    /// `chat.session`.
    pub object: &'static str,
    pub model: String,
    pub system: Option<String>,
    #[schema(value_type = Object)]
    pub sampling: Value,
    pub title: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The messages, in order (only when one session is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<SessionMessage>>,
}

impl SessionObject {
    fn new(session: ChatSession, messages: Option<Vec<SessionMessage>>) -> Self {
        SessionObject {
            id: session.id,
            object: "chat.session",
            model: session.model,
            system: session.system_prompt,
            sampling: session.sampling,
            title: session.title,
            created_at_ms: session.created_at_ms,
            updated_at_ms: session.updated_at_ms,
            messages,
        }
    }
}

/// Creates a chat session for the caller.
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions", request_body = CreateSessionRequest,
    responses((status = 201, body = SessionObject), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn create_session(
    state: &AppState,
    caller: &Caller,
    request: CreateSessionRequest,
) -> Result<Response, ApiError> {
    let CreateSessionRequest {
        model,
        system,
        title,
        temperature,
        top_p,
        top_k,
        max_tokens,
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
        seed,
        stop,
    } = request;
    if model.is_empty() {
        return Err(bad("model", "model is required: GET /v1/models lists the models you can call"));
    }
    if system.as_ref().is_some_and(|s| s.len() > MAX_SYSTEM_BYTES) {
        return Err(bad("system", format!("the system prompt is limited to {MAX_SYSTEM_BYTES} bytes")));
    }
    let sampling = SessionSampling {
        temperature,
        top_p,
        top_k,
        max_tokens,
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
        seed,
        stop,
    };
    sampling.request(&model)?;
    super::openai::CalledFor::scope(&caller.scope).check(state, &model)?;
    let scope = caller.scope.clone();
    let sampling = serde_json::to_value(&sampling).map_err(|e| ApiError::internal(e.to_string()))?;
    let session =
        db(state)?.sessions().create(&scope, NewChatSession { model, system_prompt: system, sampling, title }).await?;
    let body = SessionObject::new(session, Some(Vec::new()));
    Ok(warp::reply::with_status(warp::reply::json(&body), http::StatusCode::CREATED).into_response())
}

/// The caller's sessions, most recently used first (without their messages).
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", responses((status = 200, description = "a list of chat.session objects")))]
pub async fn list_sessions(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let data: Vec<SessionObject> =
        db(state)?.sessions().list(&scope).await?.into_iter().map(|s| SessionObject::new(s, None)).collect();
    Ok(warp::reply::json(&json!({"object": "list", "data": data})).into_response())
}

/// One of the caller's sessions with its stored messages.
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path, description = "the session id")),
    responses((status = 200, body = SessionObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_session(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let db = db(state)?;
    let session = db.sessions().get(&scope, id).await?;
    let messages = db.sessions().messages(&scope, id).await?;
    Ok(warp::reply::json(&SessionObject::new(session, Some(messages))).into_response())
}

/// Deletes one of the caller's sessions with its messages.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path, description = "the session id")),
    responses((status = 200, description = "{id, object: chat.session.deleted, deleted: true}"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_session(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    let scope = caller.scope.clone();
    let session = db(state)?.sessions().delete(&scope, id).await?;
    if let Ok(sessions) = sessions(state) {
        sessions.close(&session.id);
    }
    super::auth::audit(state, caller.audit_entry("session.delete", &session.id, json!({}))).await?;
    Ok(warp::reply::json(&json!({"id": session.id, "object": "chat.session.deleted", "deleted": true})).into_response())
}

/// Chats in a session over a WebSocket (the protocol is in this module's documentation).
#[utoipa::path(get, path = "/v1/sessions/{id}/ws", tag = "sessions", params(("id" = String, Path, description = "the session id")),
    responses((status = 101, description = "switching to the WebSocket protocol"), (status = 404, body = crate::error::ErrorBody),
        (status = 426, body = crate::error::ErrorBody)))]
pub async fn session_socket(
    state: Arc<AppState>,
    caller: &Caller,
    id: String,
    ws: Option<Ws>,
) -> Result<Response, ApiError> {
    // Another tenant's or an unknown session is refused before the upgrade.
    let session = db(&state)?.sessions().get(&caller.scope, &id).await?;
    let Some(ws) = ws else {
        return Err(ApiError::new(
            http::StatusCode::UPGRADE_REQUIRED,
            "invalid_request_error",
            "websocket_required",
            "this route is a WebSocket: connect with a WebSocket client (upgrade: websocket)",
        ));
    };
    sessions(&state)?;
    let limit = usize::try_from(state.options.max_body_bytes).unwrap_or(usize::MAX);
    let caller = caller.clone();
    Ok(ws
        .max_message_size(limit)
        .on_upgrade(move |socket| serve_socket(state, caller, session, socket))
        .into_response())
}

// ---- the socket ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFrame {
    #[serde(rename = "type")]
    _kind: String,
    content: String,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelFrame {
    #[serde(rename = "type")]
    _kind: String,
}

/// What a client frame asks for.
enum ClientFrame {
    User(UserFrame),
    Cancel,
}

fn frame_error(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

/// Reads a text frame, or says what is wrong with it.
fn parse_frame(text: &str) -> Result<ClientFrame, ApiError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| frame_error("invalid_frame", format!("the frame is not valid JSON: {e}")))?;
    let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| {
        frame_error("invalid_frame", "a frame is a JSON object with a `type`: `user` or `cancel`").with_param("type")
    })?;
    // The typed parse names the bad field (a wrong type, an unknown field).
    let typed = |err: ApiError| ApiError {
        code: "invalid_frame",
        message: format!("invalid `{kind}` frame: {}", err.message),
        ..err
    };
    match kind {
        "user" => crate::json::parse_json::<UserFrame>(text.as_bytes()).map(ClientFrame::User).map_err(typed),
        "cancel" => crate::json::parse_json::<CancelFrame>(text.as_bytes()).map(|_| ClientFrame::Cancel).map_err(typed),
        other => {
            Err(frame_error("unknown_frame_type", format!("unknown frame type `{other}`: send `user` or `cancel`"))
                .with_param("type"))
        }
    }
}

fn error_frame(err: &ApiError) -> Value {
    json!({"type": "error", "error": {"message": err.message, "type": err.kind, "code": err.code, "param": err.param}})
}

fn done_frame(finish: TurnFinish, prompt_tokens: usize, completion_tokens: usize, history_omitted: usize) -> Value {
    json!({"type": "done", "finish_reason": finish.as_str(), "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens}, "history_omitted": history_omitted})
}

/// A turn answering on this socket. Dropped before it is finished (the client went
/// away), it cancels its generation (the receiver goes with it) and records what was
/// generated, marked cancelled.
struct ActiveTurn {
    state: Arc<AppState>,
    scope: TenantScope,
    actor: SessionRef,
    turn_id: u64,
    replica: String,
    events: mpsc::Receiver<GenerationEvent>,
    content: String,
    completion_tokens: usize,
    /// History messages left out of the prompt to fit the context.
    history_omitted: usize,
    recorded: bool,
    /// Records the turn's usage when it ends (cancelled or cut turns count their tokens).
    meter: Meter,
}

impl ActiveTurn {
    fn outcome(&self, finish: TurnFinish, error: Option<String>, prompt_tokens: Option<usize>) -> TurnOutcome {
        TurnOutcome::Replied {
            content: self.content.clone(),
            finish,
            error,
            prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    /// Records the turn and waits until it is written.
    async fn record(
        mut self,
        session_id: &str,
        finish: TurnFinish,
        error: Option<String>,
        prompt_tokens: Option<usize>,
    ) -> Result<(), ApiError> {
        self.recorded = true;
        // A generation still running (a cancel) stops now, not after the write.
        self.events.close();
        let outcome = self.outcome(finish, error, prompt_tokens);
        actor::finish_turn(&self.actor, &self.scope, session_id, self.turn_id, outcome)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::from(e).with_param("turn"))
    }
}

impl Drop for ActiveTurn {
    fn drop(&mut self) {
        self.state.in_flight.leave(&self.replica);
        if !self.recorded {
            let outcome = self.outcome(TurnFinish::Cancelled, None, None);
            let _ = self.actor.cast(SessionMsg::FinishTurn {
                scope: self.scope.clone(),
                turn_id: self.turn_id,
                outcome,
                reply: None,
            });
        }
    }
}

/// The next event of the turn in progress; never, when there is none.
async fn next_event(turn: &mut Option<ActiveTurn>) -> Option<GenerationEvent> {
    match turn {
        Some(turn) => turn.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn send(socket: &mut WebSocket, frame: &Value) -> bool {
    socket.send(Message::text(frame.to_string())).await.is_ok()
}

async fn serve_socket(state: Arc<AppState>, caller: Caller, session: ChatSession, mut socket: WebSocket) {
    let Ok(sessions) = sessions(&state).cloned() else { return };
    let scope = &caller.scope;
    let opened = match sessions.snapshot(scope, &session.id).await {
        Ok(snapshot) => json!({"type": "session", "id": session.id, "model": session.model,
                               "messages": snapshot.messages.len()}),
        Err(err) => {
            let _ = send(&mut socket, &error_frame(&ApiError::from(err))).await;
            let _ = socket.close().await;
            return;
        }
    };
    if !send(&mut socket, &opened).await {
        return;
    }
    let mut turn: Option<ActiveTurn> = None;
    loop {
        // Client frames first, so a `cancel` already received is handled before more of
        // the reply is sent.
        let frames = tokio::select! {
            biased;
            frame = socket.next() => Incoming::Frame(frame),
            event = next_event(&mut turn) => Incoming::Event(event),
        };
        let keep_going = match frames {
            Incoming::Frame(None | Some(Err(_))) => false,
            Incoming::Frame(Some(Ok(message))) => {
                on_message(&state, &sessions, &caller, &session, &mut socket, &mut turn, message).await
            }
            Incoming::Event(event) => on_event(&session, &mut socket, &mut turn, event).await,
        };
        if !keep_going {
            break;
        }
    }
    // A turn still answering is cancelled and recorded by its drop.
    drop(turn);
}

enum Incoming {
    Frame(Option<Result<Message, warp::Error>>),
    Event(Option<GenerationEvent>),
}

/// Handles a client frame; false when the socket is done.
async fn on_message(
    state: &Arc<AppState>,
    sessions: &Sessions,
    caller: &Caller,
    session: &ChatSession,
    socket: &mut WebSocket,
    turn: &mut Option<ActiveTurn>,
    message: Message,
) -> bool {
    if message.is_close() {
        return false;
    }
    // tungstenite answers pings itself while the socket is read.
    if message.is_ping() || message.is_pong() {
        return true;
    }
    let Ok(text) = message.to_str() else {
        let refusal = frame_error("binary_not_supported", "binary frames are not supported: send JSON text frames");
        return send(socket, &error_frame(&refusal)).await;
    };
    match parse_frame(text) {
        Err(err) => send(socket, &error_frame(&err)).await,
        Ok(ClientFrame::Cancel) => {
            let Some(active) = turn.take() else {
                let refusal = frame_error("no_turn", "no turn is in progress to cancel");
                return send(socket, &error_frame(&refusal)).await;
            };
            let completion_tokens = active.completion_tokens;
            let history_omitted = active.history_omitted;
            // Recording drops the receiver, which cancels the generation.
            let recorded = active.record(&session.id, TurnFinish::Cancelled, None, None).await;
            if let Err(err) = recorded
                && !send(socket, &error_frame(&err)).await
            {
                return false;
            }
            send(socket, &done_frame(TurnFinish::Cancelled, 0, completion_tokens, history_omitted)).await
        }
        Ok(ClientFrame::User(frame)) => match start_turn(state, sessions, caller, session, frame).await {
            Ok(active) => {
                *turn = Some(active);
                true
            }
            Err(err) => send(socket, &error_frame(&err)).await,
        },
    }
}

/// Starts a turn: its settings checked, the actor's history taken, the generation routed.
async fn start_turn(
    state: &Arc<AppState>,
    sessions: &Sessions,
    caller: &Caller,
    session: &ChatSession,
    frame: UserFrame,
) -> Result<ActiveTurn, ApiError> {
    if frame.content.trim().is_empty() {
        return Err(bad("content", "a user frame needs non-empty `content`"));
    }
    let scope = &caller.scope;
    // A turn is an inference request: it counts against the quotas and is metered.
    let meter = Meter::admit(state, caller, &session.model, "session").await?;
    let turn = begin_metered_turn(state, sessions, scope, session, frame, meter.clone()).await;
    if let Err(err) = &turn {
        meter.fail(err.status.as_u16());
    }
    turn
}

/// A turn once admitted: the actor's history taken, the generation routed.
async fn begin_metered_turn(
    state: &Arc<AppState>,
    sessions: &Sessions,
    scope: &TenantScope,
    session: &ChatSession,
    frame: UserFrame,
    meter: Meter,
) -> Result<ActiveTurn, ApiError> {
    let mut sampling: SessionSampling = serde_json::from_value(session.sampling.clone()).unwrap_or_default();
    sampling.max_tokens = frame.max_tokens.or(sampling.max_tokens);
    sampling.temperature = frame.temperature.or(sampling.temperature);
    sampling.top_p = frame.top_p.or(sampling.top_p);
    sampling.seed = frame.seed.or(sampling.seed);
    let request = sampling.request(&session.model)?;
    let (actor, start) = sessions.begin_turn(scope, &session.id, &frame.content).await?;
    let fitted = fit_history(state, scope, &session.model, start.messages, request.max_tokens).await;
    let outcome = match fitted {
        Ok(trimmed) => start_generation(state, scope, &session.model, request, Some(trimmed.messages))
            .await
            .map(|started| (started, trimmed.dropped)),
        Err(err) => Err(err),
    };
    match outcome {
        Ok(((events, replica), history_omitted)) => {
            state.in_flight.arrive(&replica);
            Ok(ActiveTurn {
                state: Arc::clone(state),
                scope: scope.clone(),
                actor,
                turn_id: start.turn_id,
                replica,
                events,
                content: String::new(),
                completion_tokens: 0,
                history_omitted,
                recorded: false,
                meter,
            })
        }
        Err(err) => {
            // Nothing was generated: the turn ends without a record.
            if let Err(finish_err) =
                actor::finish_turn(&actor, scope, &session.id, start.turn_id, TurnOutcome::Rejected).await
            {
                tracing::warn!(session = %session.id, error = %finish_err, "cannot end a rejected turn");
            }
            Err(err)
        }
    }
}

/// The session's conversation with its oldest turns left out as far as needed to fit the
/// model's context with `max_tokens` of room for the answer. Counted on a blocking thread
/// with the model's own tokenizer and template.
async fn fit_history(
    state: &Arc<AppState>,
    scope: &TenantScope,
    model: &str,
    messages: Vec<maas_engine::ChatMessage>,
    max_tokens: usize,
) -> Result<maas_engine::fit::Trimmed, ApiError> {
    let text = state.model_texts.chat(state, super::openai::CalledFor::scope(scope), model).await?;
    tokio::task::spawn_blocking(move || {
        let budget = maas_engine::fit::prompt_budget(text.context_length, max_tokens);
        maas_engine::fit::trim_history(&text.tokenizer, &messages, budget, text.context_length)
            .map_err(|e| super::openai::engine_error(&e).with_param("content"))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the prompt thread failed: {e}")))?
}

/// Forwards a generation event; false when the socket is done.
async fn on_event(
    session: &ChatSession,
    socket: &mut WebSocket,
    turn: &mut Option<ActiveTurn>,
    event: Option<GenerationEvent>,
) -> bool {
    let Some(active) = turn.as_mut() else { return true };
    match event {
        Some(GenerationEvent::Token { text, .. }) => {
            active.completion_tokens += 1;
            active.meter.count_completion_token();
            if text.is_empty() {
                return true;
            }
            active.content.push_str(&text);
            send(socket, &json!({"type": "delta", "content": text})).await
        }
        Some(GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens }) => {
            let finish = match finish_reason {
                FinishReason::Stop => TurnFinish::Stop,
                FinishReason::Length => TurnFinish::Length,
                FinishReason::Cancelled => TurnFinish::Cancelled,
                FinishReason::ContentFilter => TurnFinish::ContentFilter,
            };
            let Some(mut active) = turn.take() else { return true };
            let history_omitted = active.history_omitted;
            active.completion_tokens = completion_tokens;
            active.meter.finish(200, prompt_tokens, completion_tokens);
            let recorded = active.record(&session.id, finish, None, Some(prompt_tokens)).await;
            if let Err(err) = recorded
                && !send(socket, &error_frame(&err)).await
            {
                return false;
            }
            send(socket, &done_frame(finish, prompt_tokens, completion_tokens, history_omitted)).await
        }
        failure @ (Some(GenerationEvent::Failed(_)) | None) => {
            let reason = match failure {
                Some(GenerationEvent::Failed(message)) => format!("generation failed: {message}"),
                _ => "the replica stopped before the generation finished".to_owned(),
            };
            let Some(active) = turn.take() else { return true };
            active.meter.fail(502);
            let completion_tokens = active.completion_tokens;
            let history_omitted = active.history_omitted;
            let recorded = active.record(&session.id, TurnFinish::Failed, Some(reason.clone()), None).await;
            let failed = ApiError::new(
                http::StatusCode::BAD_GATEWAY,
                "api_error",
                "generation_failed",
                match recorded {
                    Ok(()) => reason,
                    Err(err) => format!("{reason}; the turn was not saved: {}", err.message),
                },
            );
            send(socket, &error_frame(&failed)).await
                && send(socket, &done_frame(TurnFinish::Failed, 0, completion_tokens, history_omitted)).await
        }
    }
}
