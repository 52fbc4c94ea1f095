//! The OpenAI-compatible inference API: `/v1/models`, `/v1/chat/completions`,
//! `/v1/completions` (both with SSE streaming ending in `data: [DONE]` and
//! `stream_options.include_usage`) and `/v1/embeddings`. The `model` of a request names a
//! deployment. Each request goes to a Ready replica of it anywhere in the cluster, chosen
//! by power of two choices on the replicas' queue depth and active sequences (see
//! [`crate::load`]); a replica on
//! another node is reached over an internal route of its node
//! (`/internal/replicas/{id}/generate`, NDJSON events), and a replica that fails before
//! its first token is replaced by the next candidate.
//!
//! A remote replica's node heartbeats: the caller asks for it (`x-maas-heartbeat-ms`), and
//! the node then sends a heartbeat event whenever it has sent nothing for that long (the
//! request waits in a long queue, a long prompt is read). So silence means a dead, hung
//! or cut-off node: a remote stream silent for [`REMOTE_IDLE_TIMEOUT`] fails, and one
//! that fails before its first event goes to the next candidate. A local replica has no
//! such timeout: its queue may be long, and it cannot hang without this process.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use maas_actors::node::{ServingModel, ServingTable};
use maas_consensus::state::{DeploymentId, DeploymentOwner, DeploymentSpec, NodeId, NodeStatus, ReplicaState};
use maas_engine::{EngineError, FinishReason, GenerationEvent, GenerationRequest, SamplingParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::cluster::{COOKIE_HEADER, check_cookie, control_plane};
use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::metering::Meter;
use crate::model_text::ReplicaText;
use crate::response_cache::CachedAnswer;
use crate::response_format::{Expected, ResponseFormat};
use crate::state::AppState;
use maas_store::{Owner, TenantScope};

/// Requests this node has in flight to each replica, the load that routing balances.
#[derive(Debug, Default)]
pub struct InFlight(Mutex<HashMap<String, usize>>);

struct InFlightGuard<'a>(&'a InFlight, String);

impl InFlight {
    fn enter(&self, replica_id: &str) -> InFlightGuard<'_> {
        self.arrive(replica_id);
        InFlightGuard(self, replica_id.to_owned())
    }

    /// Counts a request to `replica_id` until [`Self::leave`].
    pub(crate) fn arrive(&self, replica_id: &str) {
        *self.0.lock().expect("in-flight lock").entry(replica_id.to_owned()).or_default() += 1;
    }

    pub(crate) fn leave(&self, replica_id: &str) {
        let mut map = self.0.lock().expect("in-flight lock");
        if let Some(count) = map.get_mut(replica_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(replica_id);
            }
        }
    }

    fn load(&self, replica_id: &str) -> usize {
        self.0.lock().expect("in-flight lock").get(replica_id).copied().unwrap_or(0)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.leave(&self.1);
    }
}

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let models = warp::path!("v1" / "models")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|s: Arc<AppState>, c: Caller| async move { list_models(&s, &c).map_err(warp::reject::custom) });
    let chat = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::json_body::<InferenceRequest>(8 * 1024 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: InferenceRequest| async move {
            chat_completions(s, c, request).await.map_err(warp::reject::custom)
        });
    let completions = warp::path!("v1" / "completions")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::json_body::<InferenceRequest>(8 * 1024 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: InferenceRequest| async move {
            completions(s, c, request).await.map_err(warp::reject::custom)
        });
    let embeddings = warp::path!("v1" / "embeddings")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and(crate::json::json_body::<EmbeddingRequest>(8 * 1024 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, request: EmbeddingRequest| async move {
            embeddings(s, c, request).await.map_err(warp::reject::custom)
        });
    let internal_generate =
        warp::path!("internal" / "replicas" / String / "generate")
            .and(warp::post())
            .and(with_state(state))
            .and(super::cluster::cookie_checked(state))
            .and(warp::header::optional::<u64>(HEARTBEAT_HEADER))
            .and(crate::json::json_body::<RemoteRequest>(8 * 1024 * 1024))
            .and_then(
                |id: String,
                 s: Arc<AppState>,
                 cookie: Option<String>,
                 heartbeat_ms: Option<u64>,
                 body: RemoteRequest| async move {
                    internal_generate(&s, cookie.as_deref(), &id, body, heartbeat_ms).map_err(warp::reject::custom)
                },
            );
    let internal_embed = warp::path!("internal" / "replicas" / String / "embed")
        .and(warp::post())
        .and(with_state(state))
        .and(super::cluster::cookie_checked(state))
        .and(crate::json::json_body::<Vec<String>>(8 * 1024 * 1024))
        .and_then(|id: String, s: Arc<AppState>, cookie: Option<String>, texts: Vec<String>| async move {
            internal_embed(&s, cookie.as_deref(), &id, texts).await.map_err(warp::reject::custom)
        });
    let internal_tokenizer = warp::path!("internal" / "replicas" / String / "tokenizer")
        .and(warp::get())
        .and(with_state(state))
        .and(super::cluster::cookie_checked(state))
        .and_then(|id: String, s: Arc<AppState>, cookie: Option<String>| async move {
            internal_tokenizer(&s, cookie.as_deref(), &id).map_err(warp::reject::custom)
        });
    models
        .or(chat)
        .unify()
        .or(completions)
        .unify()
        .or(embeddings)
        .unify()
        .or(internal_generate)
        .unify()
        .or(internal_embed)
        .unify()
        .or(internal_tokenizer)
        .unify()
        .boxed()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn serving(state: &AppState) -> Result<&ServingTable, ApiError> {
    state.serving.get().ok_or_else(|| ApiError::unavailable("the node is starting; retry shortly"))
}

// ---- the model list ----

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

/// The models the caller can call: every platform deployment and the caller's private
/// ones with a Ready replica (its name is the `model` of a request).
#[utoipa::path(get, path = "/v1/models", tag = "inference", responses((status = 200, body = ModelList)))]
pub fn list_models(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let handle = control_plane(state)?;
    let called_for = CalledFor::scope(&caller.scope);
    let data = handle.read_local(|cluster| {
        cluster
            .deployments()
            .values()
            .filter(|d| called_for.may_call(&d.spec))
            .filter(|d| cluster.replicas_of_deployment(&d.id).any(|r| r.state == ReplicaState::Ready))
            .map(|d| ModelObject {
                id: d.id.0.clone(),
                object: "model",
                created: d.created_at_ms / 1000,
                owned_by: match &d.spec.owner {
                    None => format!("maas ({}:{})", d.spec.model_name, d.spec.model_version),
                    Some(_) => format!("private ({}:{})", d.spec.model_name, d.spec.model_version),
                },
            })
            .collect()
    });
    Ok(warp::reply::json(&ModelList { object: "list", data }).into_response())
}

// ---- routing ----

/// Where a replica runs.
#[derive(Debug, Clone)]
struct Target {
    replica_id: String,
    /// None: on this node.
    remote_api: Option<String>,
}

fn next_random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    // splitmix64 over a shared counter: cheap, good enough to break ties between replicas.
    let mut z = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// For whom a deployment is called. A platform deployment (no owner) answers everyone; a
/// private one only its owner: the user who owns it, or a caller acting as the
/// organisation that owns it (a key of the organisation, or a member acting for it).
/// Every route that names a deployment to call it goes through [`CalledFor::may_call`]
/// (in [`Meter::admit`] and in [`candidates`]): another tenant's private deployment is
/// "not found", as its other things are (TEN-1).
#[derive(Debug, Clone, Copy)]
pub struct CalledFor<'a> {
    user_id: Option<&'a str>,
    owner: &'a Owner,
}

impl<'a> CalledFor<'a> {
    /// A request's caller.
    pub fn scope(scope: &'a TenantScope) -> Self {
        CalledFor { user_id: Some(scope.user_id()), owner: scope.acting_as() }
    }

    /// Work the platform does for an owner (a knowledge base's ingestion).
    pub fn owner(owner: &'a Owner) -> Self {
        CalledFor { user_id: None, owner }
    }

    pub fn may_call(self, spec: &DeploymentSpec) -> bool {
        match &spec.owner {
            None => true,
            Some(DeploymentOwner::User(id)) => {
                self.user_id == Some(id.as_str()) || matches!(self.owner, Owner::User(owner) if owner == id)
            }
            Some(DeploymentOwner::Org(id)) => matches!(self.owner, Owner::Org(owner) if owner == id),
        }
    }

    /// Refuses a deployment that does not exist or that this caller may not call, alike.
    pub fn check(self, state: &AppState, model: &str) -> Result<(), ApiError> {
        let handle = control_plane(state)?;
        let callable = handle.read_local(|cluster| {
            cluster.deployment(&DeploymentId(model.to_owned())).is_some_and(|d| self.may_call(&d.spec))
        });
        if callable { Ok(()) } else { Err(model_not_found(model)) }
    }
}

pub(crate) fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        http::StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
        format!("the model `{model}` does not exist: GET /v1/models lists the models you can call"),
    )
    .with_param("model")
}

/// The Ready replicas of deployment `model`, best first: the less loaded of two picked
/// at random, then the rest (the fallbacks of a retry).
fn candidates(state: &AppState, called_for: CalledFor<'_>, model: &str) -> Result<Vec<Target>, ApiError> {
    let handle = control_plane(state)?;
    let own = handle.id();
    let found = handle.read_local(|cluster| {
        let deployment =
            cluster.deployment(&DeploymentId(model.to_owned())).filter(|d| called_for.may_call(&d.spec))?;
        let targets: Vec<Target> = cluster
            .replicas_of_deployment(&deployment.id)
            .filter(|r| r.state == ReplicaState::Ready)
            .filter_map(|r| {
                let node = cluster.node(r.node_id)?;
                if !matches!(node.status, NodeStatus::Alive | NodeStatus::Draining) {
                    return None;
                }
                let remote_api = (r.node_id != NodeId(own)).then(|| node.api_addr.clone());
                Some(Target { replica_id: r.id.0.clone(), remote_api })
            })
            .collect();
        Some(targets)
    });
    let Some(mut targets) = found else {
        return Err(model_not_found(model));
    };
    if targets.is_empty() {
        return Err(ApiError::unavailable(format!(
            "the model `{model}` has no ready replica yet: `maas deployment list` shows why; retry shortly"
        )));
    }
    if targets.len() >= 2 {
        let count = targets.len() as u64;
        let a = usize::try_from(next_random() % count).unwrap_or(0);
        let mut b = usize::try_from(next_random() % (count - 1)).unwrap_or(0);
        if b >= a {
            b += 1;
        }
        let score = |target: &Target| {
            crate::load::score(
                state,
                &target.replica_id,
                target.remote_api.is_none(),
                state.in_flight.load(&target.replica_id),
            )
        };
        let chosen = if score(&targets[b]) < score(&targets[a]) { b } else { a };
        targets.swap(0, chosen);
    }
    Ok(targets)
}

pub(crate) fn engine_error(err: &EngineError) -> ApiError {
    match err {
        EngineError::QueueFull { .. } => ApiError::new(
            http::StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "replica_queue_full",
            err.to_string(),
        ),
        EngineError::PromptTooLong { .. } => {
            ApiError::bad_request("context_length_exceeded", err.to_string()).with_param("messages")
        }
        EngineError::BadRequest(_) | EngineError::Template(_) | EngineError::Tokenizer(_) => {
            ApiError::bad_request("invalid_request", err.to_string())
        }
        // The replica is being replaced: another one, or a retry, will serve.
        EngineError::Stopped | EngineError::Failed(_) => ApiError::unavailable(err.to_string()),
        _ => ApiError::internal(err.to_string()),
    }
}

/// Starts `request` on the first candidate that takes it; a candidate that fails before
/// answering (gone, full) is skipped for the next.
pub(crate) async fn start_generation(
    state: &Arc<AppState>,
    scope: &TenantScope,
    model: &str,
    request: GenerationRequest,
    render: Option<Vec<maas_engine::ChatMessage>>,
) -> Result<(mpsc::Receiver<GenerationEvent>, String), ApiError> {
    start_generation_for(state, CalledFor::scope(scope), Some(scope), model, request, render).await
}

/// [`start_generation`] for whoever `called_for` names; `scope`, when there is a caller,
/// picks the safety rules (the platform's without one).
async fn start_generation_for(
    state: &Arc<AppState>,
    called_for: CalledFor<'_>,
    scope: Option<&TenantScope>,
    model: &str,
    request: GenerationRequest,
    render: Option<Vec<maas_engine::ChatMessage>>,
) -> Result<(mpsc::Receiver<GenerationEvent>, String), ApiError> {
    let targets = candidates(state, called_for, model)?;
    let mut request = request;
    apply_safety(state, scope, &mut request, render.as_deref()).await?;
    let mut last_error = None;
    for target in targets {
        let mut request = request.clone();
        let outcome = match &target.remote_api {
            None => {
                let Some(ServingModel::Generator(engine)) = serving(state)?.get(&target.replica_id) else {
                    last_error =
                        Some(ApiError::unavailable(format!("replica {} is not loaded here yet", target.replica_id)));
                    continue;
                };
                if let Some(messages) = &render {
                    request.prompt = engine.render_chat(messages, true).map_err(|e| engine_error(&e))?;
                    request.add_special_tokens = false;
                }
                engine.submit(request).map_err(|e| engine_error(&e))
            }
            Some(api) => remote_generate(state, api, &target.replica_id, request, render.clone()).await,
        };
        match outcome {
            // A replica that fails or goes away before its first event is replaced by the
            // next candidate; after that, the answer is the replica's.
            Ok(mut events) => match events.recv().await {
                Some(GenerationEvent::Failed(message)) => {
                    tracing::warn!(replica = %target.replica_id, %message, "replica failed before answering; trying another");
                    last_error = Some(ApiError::unavailable(format!(
                        "replica {} failed before answering: {message}",
                        target.replica_id
                    )));
                }
                None => {
                    tracing::warn!(replica = %target.replica_id, "replica stopped before answering; trying another");
                    last_error =
                        Some(ApiError::unavailable(format!("replica {} stopped before answering", target.replica_id)));
                }
                Some(first) => return Ok((prepend(first, events), target.replica_id)),
            },
            // A bad request fails the same everywhere.
            Err(err) if err.status == http::StatusCode::BAD_REQUEST => return Err(err),
            Err(err) => {
                tracing::warn!(replica = %target.replica_id, error = %err.message, "replica refused a request; trying another");
                last_error = Some(err);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ApiError::unavailable("no replica could take the request; retry shortly")))
}

/// `first`, then the rest of a generation's events. The generation is cancelled (its
/// receiver dropped) as soon as the caller drops the returned receiver.
fn prepend(first: GenerationEvent, mut rest: mpsc::Receiver<GenerationEvent>) -> mpsc::Receiver<GenerationEvent> {
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        if sender.send(first).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                event = rest.recv() => match event {
                    Some(event) => {
                        if sender.send(event).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                () = sender.closed() => return,
            }
        }
    });
    receiver
}

/// A generation event on the internal wire. `Heartbeat` says nothing but that the node
/// and the replica are alive; it goes only to a caller that asked for heartbeats, so older
/// callers never see one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum WireEvent {
    Token { text: String, token_id: u32, logprob: Option<WireLogprob> },
    Done { finish_reason: WireFinish, prompt_tokens: usize, completion_tokens: usize },
    Failed { message: String },
    Heartbeat,
}

/// The header by which a caller of `/internal/replicas/{id}/generate` asks for heartbeats
/// every so many milliseconds; the replica's node answers with it when it sends them.
const HEARTBEAT_HEADER: &str = "x-maas-heartbeat-ms";

/// How often a replica's node sends a heartbeat on a stream that has nothing else to say.
const REMOTE_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a heartbeating remote stream may be silent before its node is taken as gone:
/// five heartbeats missed.
pub(crate) const REMOTE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a replica's node may take to answer a generate request (the answer starts as
/// soon as the request is queued; the events follow).
const REMOTE_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireFinish {
    Stop,
    Length,
    Cancelled,
    ContentFilter,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireLogprob {
    token: String,
    logprob: f32,
    top: Vec<(u32, String, f32)>,
}

impl From<GenerationEvent> for WireEvent {
    fn from(event: GenerationEvent) -> Self {
        match event {
            GenerationEvent::Token { text, token_id, logprob } => WireEvent::Token {
                text,
                token_id,
                logprob: logprob.map(|l| WireLogprob {
                    token: l.token,
                    logprob: l.logprob,
                    top: l.top.into_iter().map(|t| (t.token_id, t.token, t.logprob)).collect(),
                }),
            },
            GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens } => {
                let finish_reason = match finish_reason {
                    FinishReason::Stop => WireFinish::Stop,
                    FinishReason::Length => WireFinish::Length,
                    FinishReason::Cancelled => WireFinish::Cancelled,
                    FinishReason::ContentFilter => WireFinish::ContentFilter,
                };
                WireEvent::Done { finish_reason, prompt_tokens, completion_tokens }
            }
            GenerationEvent::Failed(message) => WireEvent::Failed { message },
        }
    }
}

impl WireEvent {
    /// The generation event this carries; `None` for a heartbeat.
    fn into_event(self) -> Option<GenerationEvent> {
        Some(match self {
            WireEvent::Token { text, token_id, logprob } => GenerationEvent::Token {
                text,
                token_id,
                logprob: logprob.map(|l| maas_engine::TokenLogprob {
                    token: l.token,
                    logprob: l.logprob,
                    top: l
                        .top
                        .into_iter()
                        .map(|(token_id, token, logprob)| maas_engine::TopLogprob { token_id, token, logprob })
                        .collect(),
                }),
            },
            WireEvent::Done { finish_reason, prompt_tokens, completion_tokens } => {
                let finish_reason = match finish_reason {
                    WireFinish::Stop => FinishReason::Stop,
                    WireFinish::Length => FinishReason::Length,
                    WireFinish::Cancelled => FinishReason::Cancelled,
                    WireFinish::ContentFilter => FinishReason::ContentFilter,
                };
                GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens }
            }
            WireEvent::Failed { message } => GenerationEvent::Failed(message),
            WireEvent::Heartbeat => return None,
        })
    }
}

/// The internal body: the request, and chat messages to render on the replica's node
/// (its engine holds the template).
#[derive(Debug, Serialize, Deserialize)]
struct RemoteRequest {
    request: GenerationRequest,
    messages: Option<Vec<(String, String)>>,
}

async fn remote_generate(
    state: &AppState,
    api: &str,
    replica_id: &str,
    request: GenerationRequest,
    render: Option<Vec<maas_engine::ChatMessage>>,
) -> Result<mpsc::Receiver<GenerationEvent>, ApiError> {
    let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
    let body = RemoteRequest {
        request,
        messages: render.map(|messages| messages.into_iter().map(|m| (m.role, m.content)).collect()),
    };
    let url = format!("{}/internal/replicas/{replica_id}/generate", api.trim_end_matches('/'));
    let sent = state
        .http
        .post(&url)
        .header(COOKIE_HEADER, cookie)
        .header(HEARTBEAT_HEADER, REMOTE_HEARTBEAT.as_millis().to_string())
        .json(&body)
        .send();
    // A node that accepts the connection and then says nothing (hung, paused) is passed
    // over like one that refuses it.
    let response = tokio::time::timeout(REMOTE_ANSWER_TIMEOUT, sent)
        .await
        .map_err(|_| {
            ApiError::unavailable(format!(
                "replica {replica_id}'s node did not answer within {} s",
                REMOTE_ANSWER_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| ApiError::unavailable(format!("replica {replica_id}'s node is unreachable: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let answer: Value = response.json().await.unwrap_or_default();
        let message = answer["error"]["message"].as_str().unwrap_or("no message").to_owned();
        return Err(match status {
            http::StatusCode::BAD_REQUEST => ApiError::bad_request("invalid_request", message),
            other => ApiError::new(other, "api_error", "replica_unavailable", message),
        });
    }
    // A node that heartbeats is taken as gone once silent for REMOTE_IDLE_TIMEOUT; one of an
    // older version, which does not, is waited for as before.
    let idle_timeout = response.headers().contains_key(HEARTBEAT_HEADER).then_some(REMOTE_IDLE_TIMEOUT);
    Ok(wire_events(response.bytes_stream(), idle_timeout))
}

/// The events of a remote generation, read from its NDJSON body as they arrive. With
/// `idle_timeout`, a body silent that long (no event, no heartbeat) ends with a failure.
/// The caller dropping the receiver drops the body, which cancels the remote sequence.
fn wire_events<E: std::fmt::Display + Send + 'static>(
    bytes: impl futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    idle_timeout: Option<Duration>,
) -> mpsc::Receiver<GenerationEvent> {
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut bytes = Box::pin(bytes);
        let mut buffer = Vec::new();
        loop {
            let next = async {
                match idle_timeout {
                    None => Ok(bytes.next().await),
                    Some(limit) => tokio::time::timeout(limit, bytes.next()).await,
                }
            };
            let next = tokio::select! {
                () = sender.closed() => return,
                next = next => next,
            };
            let chunk = match next {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) => return,
                Ok(Some(Err(err))) => {
                    let _ = sender
                        .send(GenerationEvent::Failed(format!("the replica's node broke the stream: {err}")))
                        .await;
                    return;
                }
                Err(_) => {
                    let silent = idle_timeout.unwrap_or_default().as_secs_f32();
                    let message = format!("the replica's node sent nothing for {silent} s: it is taken as gone");
                    let _ = sender.send(GenerationEvent::Failed(message)).await;
                    return;
                }
            };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let event = match serde_json::from_slice::<WireEvent>(&line[..line.len() - 1]) {
                    Ok(event) => event.into_event(),
                    Err(err) => Some(GenerationEvent::Failed(format!("the replica's node sent a bad event: {err}"))),
                };
                let Some(event) = event else { continue };
                if sender.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    receiver
}

/// A generation's events as NDJSON lines. With `heartbeat`, a heartbeat line goes out
/// whenever no event came for that long, so the caller can tell a replica that is busy
/// (its queue is long) from a node that is gone.
fn ndjson_events(
    events: mpsc::Receiver<GenerationEvent>,
    heartbeat: Option<Duration>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold(events, move |mut events| async move {
        let wire = match heartbeat {
            None => WireEvent::from(events.recv().await?),
            Some(every) => match tokio::time::timeout(every, events.recv()).await {
                Ok(event) => WireEvent::from(event?),
                Err(_) => WireEvent::Heartbeat,
            },
        };
        let mut line = serde_json::to_vec(&wire).unwrap_or_default();
        line.push(b'\n');
        Some((Ok(bytes::Bytes::from(line)), events))
    })
}

/// The serving end of [`remote_generate`]: runs the request on a replica of this node and
/// streams its events as NDJSON. Peers present the cluster cookie.
fn internal_generate(
    state: &AppState,
    cookie: Option<&str>,
    replica_id: &str,
    body: RemoteRequest,
    heartbeat_ms: Option<u64>,
) -> Result<Response, ApiError> {
    check_cookie(state, cookie)?;
    let Some(ServingModel::Generator(engine)) = serving(state)?.get(replica_id) else {
        return Err(ApiError::unavailable(format!("replica {replica_id} is not loaded on this node")));
    };
    let mut request = body.request;
    if let Some(messages) = body.messages {
        let messages: Vec<maas_engine::ChatMessage> =
            messages.into_iter().map(|(role, content)| maas_engine::ChatMessage { role, content }).collect();
        request.prompt = engine.render_chat(&messages, true).map_err(|e| engine_error(&e))?;
        request.add_special_tokens = false;
    }
    let events = engine.submit(request).map_err(|e| engine_error(&e))?;
    // Heartbeats between 0.1 and 60 s, as asked.
    let heartbeat = heartbeat_ms.map(|ms| Duration::from_millis(ms.clamp(100, 60_000)));
    let lines = ndjson_events(events, heartbeat);
    let mut response =
        warp::reply::with_header(warp::reply::stream(lines), "content-type", "application/x-ndjson").into_response();
    if let Some(every) = heartbeat {
        let millis = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        response.headers_mut().insert(HEARTBEAT_HEADER, http::HeaderValue::from(millis));
    }
    Ok(response)
}

async fn internal_embed(
    state: &AppState,
    cookie: Option<&str>,
    replica_id: &str,
    texts: Vec<String>,
) -> Result<Response, ApiError> {
    check_cookie(state, cookie)?;
    let Some(ServingModel::Embedder(model)) = serving(state)?.get(replica_id) else {
        return Err(ApiError::unavailable(format!("replica {replica_id} is not loaded on this node")));
    };
    let (vectors, tokens) = embed_local(model, texts).await?;
    Ok(warp::reply::json(&json!({"embeddings": vectors, "tokens": tokens})).into_response())
}

async fn embed_local(
    model: Arc<maas_engine::EmbeddingModel>,
    texts: Vec<String>,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    tokio::task::spawn_blocking(move || {
        let tokens = texts.iter().map(|t| model.count_tokens(t)).sum::<Result<usize, _>>()?;
        Ok::<_, EngineError>((model.embed(&texts)?, tokens))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| engine_error(&e))
}

// ---- the OpenAI requests ----

/// A message's content: a string, or OpenAI's list of parts (text parts are joined).
/// A message's content: text, or a list of parts (of which text parts are read).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// A message of a conversation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    /// `system`, `user`, `assistant` (or `developer`, `tool`).
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
}

/// `stop` as OpenAI takes it: one sequence or a list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `logprobs`: a flag in chat completions, a count of alternatives in text completions.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Logprobs {
    Flag(bool),
    Top(usize),
}

/// A text completion's prompt: one text or several.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// A chat or text completion request: OpenAI's fields of both (each endpoint refuses the
/// other's). One type, not two with the sampling fields flattened in: serde's `flatten`
/// would hide which field a type error is in.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    pub model: String,
    /// Chat completions.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessageIn>>,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    /// Text completions.
    #[serde(default)]
    pub prompt: Option<Prompt>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub logprobs: Option<Logprobs>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// An extension (vLLM's): sample among the k most likely tokens.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// An extension (vLLM's): divides the logits of tokens already seen.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub user: Option<String>,
    /// `text`, `json_object` or `json_schema`: the answer is checked when complete.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// A maas extension of chat completions: answer from these knowledge bases, with
    /// citations.
    #[serde(default)]
    pub knowledge_base_ids: Option<Vec<String>>,
    /// How the knowledge bases are searched (with `knowledge_base_ids`).
    #[serde(default)]
    pub retrieval: Option<crate::knowledge::rag::RagOptions>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message).with_param(param)
}

/// The engine request for OpenAI's sampling fields, checked.
pub(crate) fn generation(
    sampling: &InferenceRequest,
    prompt: String,
    logprobs: Option<usize>,
) -> Result<GenerationRequest, ApiError> {
    if sampling.n.is_some_and(|n| n != 1) {
        return Err(bad("n", "only n = 1 is supported: send several requests for several choices"));
    }
    let max_tokens = sampling.max_completion_tokens.or(sampling.max_tokens).unwrap_or(256);
    if max_tokens < 1 {
        return Err(bad("max_tokens", format!("max_tokens must be at least 1, got {max_tokens}")));
    }
    let top_k = sampling.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(bad("top_k", "top_k must not be negative"));
    }
    let stop = match &sampling.stop {
        None => Vec::new(),
        Some(Stop::One(text)) => vec![text.clone()],
        Some(Stop::Many(list)) => list.clone(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad("stop", "stop takes up to 4 non-empty sequences"));
    }
    let params = SamplingParams {
        temperature: sampling.temperature.unwrap_or(1.0),
        top_p: sampling.top_p.unwrap_or(1.0),
        top_k: usize::try_from(top_k).unwrap_or(0),
        repetition_penalty: sampling.repetition_penalty.unwrap_or(1.0),
        presence_penalty: sampling.presence_penalty.unwrap_or(0.0),
        frequency_penalty: sampling.frequency_penalty.unwrap_or(0.0),
        seed: sampling.seed,
    };
    params.validate().map_err(|reason| bad("temperature", reason))?;
    if logprobs.is_some_and(|n| n > maas_engine::engine::MAX_TOP_LOGPROBS) {
        return Err(bad(
            "top_logprobs",
            format!("at most {} top log-probabilities", maas_engine::engine::MAX_TOP_LOGPROBS),
        ));
    }
    Ok(GenerationRequest {
        prompt,
        max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
        sampling: params,
        stop,
        logprobs,
        add_special_tokens: true,
        ignore_eos: false,
        filter: maas_engine::OutputFilter::default(),
    })
}

fn message_text(message: &ChatMessageIn) -> Result<String, ApiError> {
    Ok(match &message.content {
        None => String::new(),
        Some(Content::Text(text)) => text.clone(),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                if part.kind != "text" {
                    return Err(bad(
                        "messages",
                        format!("content parts of type `{}` are not supported: send text", part.kind),
                    ));
                }
                text.push_str(part.text.as_deref().unwrap_or_default());
            }
            text
        }
    })
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
        FinishReason::ContentFilter => "content_filter",
    }
}

/// The characters of a text completion's prompt: where the completion's `text_offset`s
/// begin, as OpenAI counts them.
fn generation_prompt_chars(request: &InferenceRequest) -> usize {
    match &request.prompt {
        Some(Prompt::One(text)) => text.chars().count(),
        Some(Prompt::Many(list)) => list.first().map_or(0, |text| text.chars().count()),
        None => 0,
    }
}

/// The legacy completions' `logprobs` object for `entries` (as [`logprob_json`] makes
/// them): `tokens`, `token_logprobs`, `top_logprobs` (one `{token: logprob}` map per
/// token, or null when no alternatives were asked for) and `text_offset` (each token's
/// character offset, the first at `first_offset`).
fn legacy_logprobs(entries: &[Value], first_offset: usize, with_top: bool) -> Value {
    let mut offset = first_offset;
    let mut text_offset = Vec::with_capacity(entries.len());
    for entry in entries {
        text_offset.push(offset);
        offset += entry["token"].as_str().map_or(0, |token| token.chars().count());
    }
    let top_logprobs = with_top.then(|| {
        entries
            .iter()
            .map(|entry| {
                let alternatives = entry["top_logprobs"].as_array().map(Vec::as_slice).unwrap_or_default();
                let map: serde_json::Map<String, Value> = alternatives
                    .iter()
                    .filter_map(|top| Some((top["token"].as_str()?.to_owned(), top["logprob"].clone())))
                    .collect();
                Value::Object(map)
            })
            .collect::<Vec<_>>()
    });
    json!({
        "tokens": entries.iter().map(|entry| entry["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|entry| entry["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

fn logprob_json(logprob: &maas_engine::TokenLogprob) -> Value {
    json!({
        "token": logprob.token,
        "logprob": logprob.logprob,
        "bytes": logprob.token.as_bytes(),
        "top_logprobs": logprob.top.iter().map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes()})).collect::<Vec<_>>(),
    })
}

/// What a finished generation produced.
struct Collected {
    text: String,
    logprobs: Vec<Value>,
    finish_reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut events: mpsc::Receiver<GenerationEvent>) -> Result<Collected, ApiError> {
    let mut collected = Collected {
        text: String::new(),
        logprobs: Vec::new(),
        finish_reason: FinishReason::Cancelled,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    while let Some(event) = events.recv().await {
        match event {
            GenerationEvent::Token { text, logprob, .. } => {
                collected.text.push_str(&text);
                if let Some(logprob) = &logprob {
                    collected.logprobs.push(logprob_json(logprob));
                }
            }
            GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens } => {
                collected.finish_reason = finish_reason;
                collected.prompt_tokens = prompt_tokens;
                collected.completion_tokens = completion_tokens;
                return Ok(collected);
            }
            GenerationEvent::Failed(message) => {
                return Err(ApiError::internal(format!("generation failed: {message}")));
            }
        }
    }
    Err(ApiError::internal("the replica stopped before the generation finished"))
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// OpenAI's chat completions: the messages rendered with the model's chat template.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "inference", request_body(content = InferenceRequest, description = "OpenAI's chat completion request (`messages`; `knowledge_base_ids` and `retrieval` answer from knowledge bases with citations)"),
    responses((status = 200, description = "a chat.completion, or an SSE stream of chat.completion.chunk ending in data: [DONE]", content_type = "application/json"),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn chat_completions(
    state: Arc<AppState>,
    caller: Caller,
    request: InferenceRequest,
) -> Result<Response, ApiError> {
    let meter = Meter::admit(&state, &caller, &request.model, "chat").await?;
    let result = chat_answer(state, &caller, request, meter.clone()).await;
    if let Err(err) = &result {
        meter.fail(err.status.as_u16());
    }
    result
}

async fn chat_answer(
    state: Arc<AppState>,
    caller: &Caller,
    request: InferenceRequest,
    meter: Meter,
) -> Result<Response, ApiError> {
    if request.prompt.is_some() || request.echo {
        return Err(bad("prompt", "chat completions take messages, not a prompt: use /v1/completions for a prompt"));
    }
    let chat = request.messages.as_deref().unwrap_or_default();
    if chat.is_empty() {
        return Err(bad("messages", "messages must hold at least one message"));
    }
    let mut messages = Vec::with_capacity(chat.len());
    for message in chat {
        if !matches!(message.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
            return Err(bad("messages", format!("unknown role `{}`", message.role)));
        }
        let role = if message.role == "developer" { "system".to_owned() } else { message.role.clone() };
        messages.push(maas_engine::ChatMessage { role, content: message_text(message)? });
    }
    let logprobs = match request.logprobs {
        None | Some(Logprobs::Flag(false)) => None,
        Some(Logprobs::Flag(true)) => Some(request.top_logprobs.unwrap_or(0)),
        Some(Logprobs::Top(_)) => {
            return Err(bad("logprobs", "logprobs is true or false; top_logprobs sets the count"));
        }
    };
    let generation_request = generation(&request, String::new(), logprobs)?;
    let expected = crate::response_format::expected(request.response_format.as_ref())?;
    let (messages, rag) = with_knowledge(&state, caller, &request, messages, generation_request.max_tokens).await?;
    if request.retrieval.is_some() && rag.is_none() {
        return Err(bad("retrieval", "retrieval needs knowledge_base_ids"));
    }
    let source =
        answer_source(&state, &caller.scope, &request.model, "chat", generation_request, Some(messages)).await?;
    let id = new_id("chatcmpl");
    let created = unix_now();
    let model = request.model.clone();
    if !request.stream {
        let (done, hit) = finish_answer(&state, source, expected.as_ref()).await?;
        meter.finish(200, done.prompt_tokens, done.completion_tokens);
        let mut body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": if logprobs.is_some() { json!({"content": done.logprobs}) } else { Value::Null },
                "finish_reason": finish_name(done.finish_reason),
            }],
            "usage": usage(done.prompt_tokens, done.completion_tokens),
        });
        if let Some(Value::Object(extra)) = rag {
            body.as_object_mut().expect("an object").extend(extra);
        }
        return Ok(mark_cached(warp::reply::json(&body).into_response(), hit));
    }
    let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let chunk = move |delta: Value, logprobs: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
    };
    Ok(sse(state, meter, source, expected, include_usage, move |part| match part {
        Part::Start => {
            let mut first = chunk(json!({"role": "assistant", "content": ""}), Value::Null, Value::Null);
            // The sources come first, so a client can show them while the answer streams.
            if let Some(Value::Object(extra)) = &rag {
                first.as_object_mut().expect("an object").extend(extra.clone());
            }
            Some(first)
        }
        Part::Token { text, logprob } => {
            if text.is_empty() && logprob.is_none() {
                return None;
            }
            let logprobs = logprob.map_or(Value::Null, |l| json!({"content": [l]}));
            Some(chunk(json!({"content": text}), logprobs, Value::Null))
        }
        Part::Finish(reason) => Some(chunk(json!({}), Value::Null, json!(finish_name(reason)))),
        Part::Usage(usage) => {
            let mut last = chunk(Value::Null, Value::Null, Value::Null);
            last["choices"] = json!([]);
            last["usage"] = usage;
            Some(last)
        }
    }))
}

/// OpenAI's (legacy) text completions: the prompt as it is.
#[utoipa::path(post, path = "/v1/completions", tag = "inference", request_body(content = InferenceRequest, description = "OpenAI's completion request (`prompt`)"),
    responses((status = 200, description = "a text_completion, or an SSE stream ending in data: [DONE]", content_type = "application/json"),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn completions(
    state: Arc<AppState>,
    caller: Caller,
    request: InferenceRequest,
) -> Result<Response, ApiError> {
    let meter = Meter::admit(&state, &caller, &request.model, "completions").await?;
    let result = completion_answer(state, &caller, request, meter.clone()).await;
    if let Err(err) = &result {
        meter.fail(err.status.as_u16());
    }
    result
}

async fn completion_answer(
    state: Arc<AppState>,
    caller: &Caller,
    request: InferenceRequest,
    meter: Meter,
) -> Result<Response, ApiError> {
    if request.messages.is_some() || request.top_logprobs.is_some() {
        return Err(bad("messages", "text completions take a prompt, not messages: use /v1/chat/completions"));
    }
    if request.knowledge_base_ids.is_some() || request.retrieval.is_some() {
        return Err(bad(
            "knowledge_base_ids",
            "knowledge bases answer chat completions: use /v1/chat/completions with messages",
        ));
    }
    let prompt = match &request.prompt {
        None => return Err(bad("prompt", "prompt is required")),
        Some(Prompt::One(text)) => text.clone(),
        Some(Prompt::Many(list)) if list.len() == 1 => list[0].clone(),
        Some(Prompt::Many(_)) => return Err(bad("prompt", "send one prompt per request")),
    };
    if request.echo {
        return Err(bad("echo", "echo is not supported"));
    }
    let logprobs = match request.logprobs {
        None | Some(Logprobs::Flag(false)) => None,
        Some(Logprobs::Flag(true)) => Some(0),
        Some(Logprobs::Top(count)) => Some(count),
    };
    let generation_request = generation(&request, prompt, logprobs)?;
    let expected = crate::response_format::expected(request.response_format.as_ref())?;
    let source = answer_source(&state, &caller.scope, &request.model, "completions", generation_request, None).await?;
    let id = new_id("cmpl");
    let created = unix_now();
    let model = request.model.clone();
    if !request.stream {
        let (done, hit) = finish_answer(&state, source, expected.as_ref()).await?;
        meter.finish(200, done.prompt_tokens, done.completion_tokens);
        let logprobs = logprobs
            .map_or(Value::Null, |top| legacy_logprobs(&done.logprobs, generation_prompt_chars(&request), top > 0));
        let body = json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": done.text, "logprobs": logprobs, "finish_reason": finish_name(done.finish_reason)}],
            "usage": usage(done.prompt_tokens, done.completion_tokens),
        });
        return Ok(mark_cached(warp::reply::json(&body).into_response(), hit));
    }
    let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let chunk = move |text: &str, logprobs: Value, finish: Value| {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
    };
    // Each streamed token's log-probability goes with its chunk (one chunk per token, even
    // one whose text is held back for a later one), its offset counted on from the prompt.
    let offset = std::sync::atomic::AtomicUsize::new(generation_prompt_chars(&request));
    Ok(sse(state, meter, source, expected, include_usage, move |part| match part {
        Part::Start => None,
        Part::Token { text, logprob: Some(logprob) } if logprobs.is_some() => {
            let length = logprob["token"].as_str().map_or(0, |token| token.chars().count());
            let at = offset.fetch_add(length, std::sync::atomic::Ordering::Relaxed);
            let shaped = legacy_logprobs(&[logprob], at, logprobs.is_some_and(|top| top > 0));
            Some(chunk(&text, shaped, Value::Null))
        }
        Part::Token { text, .. } => (!text.is_empty()).then(|| chunk(&text, Value::Null, Value::Null)),
        Part::Finish(reason) => Some(chunk("", Value::Null, json!(finish_name(reason)))),
        Part::Usage(usage) => {
            let mut last = chunk("", Value::Null, Value::Null);
            last["choices"] = json!([]);
            last["usage"] = usage;
            Some(last)
        }
    }))
}

/// A step of a streamed generation, for the endpoint to shape into its chunk.
enum Part {
    Start,
    Token { text: String, logprob: Option<Value> },
    Finish(FinishReason),
    Usage(Value),
}

/// Where an answer comes from: the response cache, or a replica generating it.
enum Source {
    Cached(CachedAnswer),
    Live {
        events: mpsc::Receiver<GenerationEvent>,
        replica: String,
        /// Where to keep the answer once it is complete (a deterministic request).
        cache_key: Option<String>,
    },
}

/// The output filter of the caller's safety rules on `request`, after its text passed
/// their input rules.
/// A whole greedy answer of chat `model` to `messages`, at most `max_tokens` tokens, for
/// the platform's own use (condensing a question, extracting a graph).
pub(crate) async fn complete_chat(
    state: &Arc<AppState>,
    (called_for, scope): (CalledFor<'_>, Option<&TenantScope>),
    work: &crate::metering::Work,
    model: &str,
    messages: Vec<maas_engine::ChatMessage>,
    max_tokens: usize,
) -> Result<String, ApiError> {
    let started = std::time::Instant::now();
    let request = GenerationRequest {
        max_tokens,
        sampling: maas_engine::SamplingParams { temperature: 0.0, ..maas_engine::SamplingParams::default() },
        ..GenerationRequest::default()
    };
    let (mut events, _) = start_generation_for(state, called_for, scope, model, request, Some(messages)).await?;
    let mut text = String::new();
    let mut generated = 0;
    while let Some(event) = events.recv().await {
        match event {
            GenerationEvent::Token { text: piece, .. } => {
                text.push_str(&piece);
                generated += 1;
            }
            GenerationEvent::Failed(message) => {
                work.record(state, model, (0, generated), started);
                return Err(ApiError::unavailable(message));
            }
            GenerationEvent::Done { prompt_tokens, completion_tokens, .. } => {
                work.record(state, model, (prompt_tokens, completion_tokens), started);
                break;
            }
        }
    }
    Ok(text)
}

async fn apply_safety(
    state: &AppState,
    scope: Option<&TenantScope>,
    request: &mut GenerationRequest,
    render: Option<&[maas_engine::ChatMessage]>,
) -> Result<(), ApiError> {
    let policy = crate::safety::policy(state, scope).await?;
    policy.check_input(
        std::iter::once(request.prompt.as_str()).chain(render.into_iter().flatten().map(|m| m.content.as_str())),
    )?;
    request.filter.clone_from(&policy.output);
    Ok(())
}

/// What makes a deployment's answers what they are: its model version and generation.
fn deployment_version(state: &AppState, model: &str) -> Option<String> {
    let handle = state.cluster.get()?;
    handle.read_local(|cluster| {
        let deployment = cluster.deployment(&DeploymentId(model.to_owned()))?;
        let spec = &deployment.spec;
        Some(format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            deployment.id.0,
            spec.model_name,
            spec.model_version,
            spec.model_path.as_deref().unwrap_or_default(),
            deployment.generation
        ))
    })
}

/// A chat's messages with the sources of its knowledge bases put in, and what the answer
/// carries of them (`citations`, `retrieval_query`, `sources_omitted`); the messages as
/// they are without `knowledge_base_ids`.
async fn with_knowledge(
    state: &Arc<AppState>,
    caller: &Caller,
    request: &InferenceRequest,
    messages: Vec<maas_engine::ChatMessage>,
    max_tokens: usize,
) -> Result<(Vec<maas_engine::ChatMessage>, Option<Value>), ApiError> {
    let Some(ids) = &request.knowledge_base_ids else {
        return Ok((messages, None));
    };
    let options = request.retrieval.clone().unwrap_or_default();
    let augmented =
        crate::knowledge::rag::augment(state, caller, &request.model, ids, &options, messages, max_tokens).await?;
    let extra = json!({
        "citations": augmented.citations,
        "retrieval_query": augmented.query,
        "sources_omitted": augmented.omitted,
    });
    Ok((augmented.messages, Some(extra)))
}

/// The answer of a deterministic request from the cache, or a generation started on a
/// replica (with the key to keep its answer under).
async fn answer_source(
    state: &Arc<AppState>,
    scope: &TenantScope,
    model: &str,
    endpoint: &str,
    mut request: GenerationRequest,
    render: Option<Vec<maas_engine::ChatMessage>>,
) -> Result<Source, ApiError> {
    let mut cache_key = None;
    if state.response_cache.enabled() && crate::response_cache::is_deterministic(&request) {
        apply_safety(state, Some(scope), &mut request, render.as_deref()).await?;
        if let Some(deployment) = deployment_version(state, model) {
            cache_key = crate::response_cache::key(scope.user_id(), endpoint, &deployment, &request, render.as_deref());
        }
    }
    if let Some(key) = &cache_key
        && let Some(hit) = state.response_cache.get(key).await
    {
        metrics::counter!("maas_response_cache_total", "outcome" => "hit").increment(1);
        return Ok(Source::Cached(hit));
    }
    if cache_key.is_some() {
        metrics::counter!("maas_response_cache_total", "outcome" => "miss").increment(1);
    }
    let (events, replica) = start_generation(state, scope, model, request, render).await?;
    Ok(Source::Live { events, replica, cache_key })
}

/// A whole answer, checked against `response_format`; true when it came from the cache.
async fn finish_answer(
    state: &AppState,
    source: Source,
    expected: Option<&Expected>,
) -> Result<(Collected, bool), ApiError> {
    let (done, hit) = match source {
        Source::Cached(answer) => (
            Collected {
                text: answer.text,
                logprobs: Vec::new(),
                finish_reason: answer.finish_reason,
                prompt_tokens: answer.prompt_tokens,
                completion_tokens: answer.completion_tokens,
            },
            true,
        ),
        Source::Live { events, replica, cache_key } => {
            let _guard = state.in_flight.enter(&replica);
            let done = collect(events).await?;
            if let Some(key) = cache_key {
                state
                    .response_cache
                    .put(key, cached(&done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens))
                    .await;
            }
            (done, false)
        }
    };
    if let Some(expected) = expected {
        expected.check(&done.text, done.finish_reason)?;
    }
    Ok((done, hit))
}

fn cached(text: &str, finish_reason: FinishReason, prompt_tokens: usize, completion_tokens: usize) -> CachedAnswer {
    CachedAnswer { text: text.to_owned(), finish_reason, prompt_tokens, completion_tokens }
}

/// Marks an answer served from the response cache (`x-maas-cache: hit`).
fn mark_cached(mut response: Response, hit: bool) -> Response {
    if hit {
        response.headers_mut().insert("x-maas-cache", http::HeaderValue::from_static("hit"));
    }
    response
}

/// A cached answer as the events of a generation.
fn replay(answer: CachedAnswer) -> mpsc::Receiver<GenerationEvent> {
    let (sender, receiver) = mpsc::channel(2);
    let _ = sender.try_send(GenerationEvent::Token { text: answer.text, token_id: 0, logprob: None });
    let _ = sender.try_send(GenerationEvent::Done {
        finish_reason: answer.finish_reason,
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.completion_tokens,
    });
    receiver
}

/// The state of one SSE answer.
struct Stream {
    state: Arc<AppState>,
    /// The replica generating, counted in its load until the stream ends.
    replica: Option<String>,
    events: mpsc::Receiver<GenerationEvent>,
    started: bool,
    pending: std::collections::VecDeque<String>,
    finished: bool,
    expected: Option<Expected>,
    cache_key: Option<String>,
    /// The answer so far, kept when it is to be checked or cached.
    text: String,
    /// Records the request's usage when the stream ends or is cut.
    meter: Meter,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // The request's place in the replica's load ends with its stream.
        if let Some(replica) = &self.replica {
            self.state.in_flight.leave(replica);
        }
    }
}

/// Streams a generation as server-sent events: the endpoint's chunks, then `[DONE]`. The
/// client going away drops the stream, and with it the generation's receiver, which
/// cancels the sequence. An answer that fails `response_format` ends with that error
/// before `[DONE]`; a complete answer of a deterministic request is kept in the cache.
fn sse(
    state: Arc<AppState>,
    meter: Meter,
    source: Source,
    expected: Option<Expected>,
    include_usage: bool,
    shape: impl Fn(Part) -> Option<Value> + Send + Sync + 'static,
) -> Response {
    let (events, replica, cache_key, hit) = match source {
        Source::Cached(answer) => (replay(answer), None, None, true),
        Source::Live { events, replica, cache_key } => {
            state.in_flight.arrive(&replica);
            (events, Some(replica), cache_key, false)
        }
    };
    let shape = Arc::new(shape);
    let initial = Stream {
        state,
        replica,
        events,
        started: false,
        pending: std::collections::VecDeque::new(),
        finished: false,
        expected,
        cache_key,
        text: String::new(),
        meter,
    };
    let stream = futures_util::stream::unfold(initial, move |mut s| {
        let shape = Arc::clone(&shape);
        async move {
            loop {
                if let Some(data) = s.pending.pop_front() {
                    return Some((Ok::<_, Infallible>(warp::sse::Event::default().data(data)), s));
                }
                if s.finished {
                    return None;
                }
                if !s.started {
                    s.started = true;
                    if let Some(value) = shape(Part::Start) {
                        s.pending.push_back(value.to_string());
                    }
                    continue;
                }
                match s.events.recv().await {
                    Some(GenerationEvent::Token { text, logprob, .. }) => {
                        s.meter.count_completion_token();
                        if s.expected.is_some() || s.cache_key.is_some() {
                            s.text.push_str(&text);
                        }
                        if let Some(value) = shape(Part::Token { text, logprob: logprob.as_ref().map(logprob_json) }) {
                            s.pending.push_back(value.to_string());
                        }
                    }
                    Some(GenerationEvent::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                        s.meter.finish(200, prompt_tokens, completion_tokens);
                        if let Some(value) = shape(Part::Finish(finish_reason)) {
                            s.pending.push_back(value.to_string());
                        }
                        if include_usage
                            && let Some(value) = shape(Part::Usage(usage(prompt_tokens, completion_tokens)))
                        {
                            s.pending.push_back(value.to_string());
                        }
                        if let Some(expected) = &s.expected
                            && let Err(err) = expected.check(&s.text, finish_reason)
                        {
                            s.pending.push_back(serde_json::to_string(&err.body()).unwrap_or_default());
                        }
                        if let Some(key) = s.cache_key.take() {
                            let answer = cached(&s.text, finish_reason, prompt_tokens, completion_tokens);
                            let state = Arc::clone(&s.state);
                            tokio::spawn(async move { state.response_cache.put(key, answer).await });
                        }
                        s.pending.push_back("[DONE]".to_owned());
                        s.finished = true;
                    }
                    Some(GenerationEvent::Failed(message)) => {
                        s.meter.fail(502);
                        let error = json!({"error": {"message": format!("generation failed: {message}"), "type": "api_error", "param": null, "code": "generation_failed"}});
                        s.pending.push_back(error.to_string());
                        s.pending.push_back("[DONE]".to_owned());
                        s.finished = true;
                    }
                    None => {
                        s.meter.fail(502);
                        let error = json!({"error": {"message": "the replica stopped before the generation finished", "type": "api_error", "param": null, "code": "replica_stopped"}});
                        s.pending.push_back(error.to_string());
                        s.pending.push_back("[DONE]".to_owned());
                        s.finished = true;
                    }
                }
            }
        }
    });
    mark_cached(warp::sse::reply(stream).into_response(), hit)
}

/// One text to embed, or several.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<usize>,
    #[serde(default)]
    pub user: Option<String>,
}

/// The most inputs one embeddings request may carry.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// OpenAI's embeddings, from a BERT-family deployment (mean pooling, unit length).
#[utoipa::path(post, path = "/v1/embeddings", tag = "inference", request_body(content = EmbeddingRequest, description = "OpenAI's embeddings request"),
    responses((status = 200, description = "a list of embeddings", content_type = "application/json"),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn embeddings(state: Arc<AppState>, caller: Caller, request: EmbeddingRequest) -> Result<Response, ApiError> {
    let meter = Meter::admit(&state, &caller, &request.model, "embeddings").await?;
    let result = embedding_answer(&state, &caller, request, &meter).await;
    if let Err(err) = &result {
        meter.fail(err.status.as_u16());
    }
    result
}

async fn embedding_answer(
    state: &Arc<AppState>,
    caller: &Caller,
    request: EmbeddingRequest,
    meter: &Meter,
) -> Result<Response, ApiError> {
    let state = Arc::clone(state);
    let texts = match request.input {
        EmbeddingInput::One(text) => vec![text],
        EmbeddingInput::Many(list) => list,
    };
    if texts.is_empty() || texts.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad("input", format!("input must hold 1 to {MAX_EMBEDDING_INPUTS} strings")));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(bad("encoding_format", format!("encoding_format `{other}` is not float or base64"))),
    };
    // The caller's input rules hold for texts to embed as they do for prompts.
    crate::safety::policy(&state, Some(&caller.scope)).await?.check_input(texts.iter().map(String::as_str))?;
    let (vectors, tokens) = embed_texts(&state, CalledFor::scope(&caller.scope), &request.model, texts).await?;
    if let Some(dimensions) = request.dimensions
        && vectors.first().is_some_and(|v| v.len() != dimensions)
    {
        return Err(bad("dimensions", format!("this model's embeddings have {} dimensions", vectors[0].len())));
    }
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    meter.finish(200, tokens, 0);
    let body = json!({"object": "list", "data": data, "model": request.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    Ok(warp::reply::json(&body).into_response())
}

/// Embeds `texts` on a Ready replica of the embedding deployment `model`: the less loaded
/// of two, the others as fallbacks. Returns the vectors in order and the tokens counted.
/// `/v1/embeddings` and knowledge-base ingestion and retrieval share it, so one
/// deployment serves both.
pub(crate) async fn embed_texts(
    state: &Arc<AppState>,
    called_for: CalledFor<'_>,
    model: &str,
    texts: Vec<String>,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let targets = candidates(state, called_for, model)?;
    let mut last_error = None;
    for target in targets {
        let _guard = state.in_flight.enter(&target.replica_id);
        let outcome = match &target.remote_api {
            None => match serving(state)?.get(&target.replica_id) {
                Some(ServingModel::Embedder(embedder)) => embed_local(embedder, texts.clone()).await,
                Some(ServingModel::Generator(_)) => {
                    return Err(bad("model", format!("`{model}` is not an embedding model")));
                }
                None => Err(ApiError::unavailable(format!("replica {} is not loaded here yet", target.replica_id))),
            },
            Some(api) => remote_embed(state, api, &target.replica_id, &texts).await,
        };
        match outcome {
            Ok(done) => return Ok(done),
            Err(err) if err.status == http::StatusCode::BAD_REQUEST => return Err(err),
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.unwrap_or_else(|| ApiError::unavailable("no replica could take the request")))
}

/// The text side (tokenizer, template, context or embedding length) of deployment
/// `model`, from one of its Ready replicas: [`crate::model_text`] caches it.
pub(crate) async fn replica_text(
    state: &Arc<AppState>,
    called_for: CalledFor<'_>,
    model: &str,
) -> Result<ReplicaText, ApiError> {
    let targets = candidates(state, called_for, model)?;
    let mut last_error = None;
    for target in targets {
        let outcome = match &target.remote_api {
            None => match serving(state)?.get(&target.replica_id) {
                Some(loaded) => ReplicaText::of(&loaded).map_err(|e| engine_error(&e)),
                None => Err(ApiError::unavailable(format!("replica {} is not loaded here yet", target.replica_id))),
            },
            Some(api) => replica_call(state, api, &target.replica_id, "tokenizer", None).await.and_then(|answer| {
                serde_json::from_value(answer)
                    .map_err(|e| ApiError::internal(format!("replica {}'s tokenizer: {e}", target.replica_id)))
            }),
        };
        match outcome {
            Ok(done) => return Ok(done),
            Err(err) if err.status == http::StatusCode::BAD_REQUEST => return Err(err),
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.unwrap_or_else(|| ApiError::unavailable("no replica could take the request")))
}

/// Calls `/internal/replicas/{replica_id}/{what}` on the replica's node with the cluster
/// cookie: a POST of `body`, or a GET without one. The answer's JSON, or its error.
async fn replica_call(
    state: &AppState,
    api: &str,
    replica_id: &str,
    what: &str,
    body: Option<&Value>,
) -> Result<Value, ApiError> {
    let cookie = state.cluster_cookie.get().cloned().unwrap_or_default();
    let url = format!("{}/internal/replicas/{replica_id}/{what}", api.trim_end_matches('/'));
    let request = match body {
        Some(body) => state.http.post(&url).json(body),
        None => state.http.get(&url),
    };
    let response = request
        .header(COOKIE_HEADER, cookie)
        .send()
        .await
        .map_err(|e| ApiError::unavailable(format!("replica {replica_id}'s node is unreachable: {e}")))?;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    if !status.is_success() {
        let message = answer["error"]["message"].as_str().unwrap_or("no message").to_owned();
        return Err(ApiError::new(status, "api_error", "replica_unavailable", message));
    }
    Ok(answer)
}

/// The serving end of [`replica_text`] for a peer.
fn internal_tokenizer(state: &AppState, cookie: Option<&str>, replica_id: &str) -> Result<Response, ApiError> {
    check_cookie(state, cookie)?;
    let Some(loaded) = serving(state)?.get(replica_id) else {
        return Err(ApiError::unavailable(format!("replica {replica_id} is not loaded on this node")));
    };
    let text = ReplicaText::of(&loaded).map_err(|e| engine_error(&e))?;
    Ok(warp::reply::json(&text).into_response())
}

async fn remote_embed(
    state: &AppState,
    api: &str,
    replica_id: &str,
    texts: &[String],
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let answer = replica_call(state, api, replica_id, "embed", Some(&json!(texts))).await?;
    let vectors: Vec<Vec<f32>> = serde_json::from_value(answer["embeddings"].clone())
        .map_err(|e| ApiError::internal(format!("bad embeddings from {replica_id}: {e}")))?;
    Ok((vectors, usize::try_from(answer["tokens"].as_u64().unwrap_or(0)).unwrap_or(0)))
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Runs one request of a batch in-process through the same handler as its HTTP route
/// (`url` is the route's path) and returns the JSON body of the answer, or the error the
/// route would have answered. Batches do not stream.
pub(crate) async fn run_json(state: Arc<AppState>, caller: Caller, url: &str, body: &Value) -> Result<Value, ApiError> {
    use http_body_util::BodyExt as _;
    if body.get("stream").is_some_and(|stream| stream != &Value::Bool(false)) {
        return Err(bad("stream", "a batch request cannot stream: leave `stream` out"));
    }
    let bytes = serde_json::to_vec(body).map_err(|err| ApiError::internal(err.to_string()))?;
    let response = match url {
        "/v1/chat/completions" => chat_completions(state, caller, crate::json::parse_json(&bytes)?).await?,
        "/v1/completions" => completions(state, caller, crate::json::parse_json(&bytes)?).await?,
        "/v1/embeddings" => embeddings(state, caller, crate::json::parse_json(&bytes)?).await?,
        other => {
            return Err(
                ApiError::bad_request("invalid_url", format!("`{other}` cannot run in a batch")).with_param("url")
            );
        }
    };
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|err| ApiError::internal(format!("reading the answer failed: {err}")))?;
    serde_json::from_slice(&collected.to_bytes())
        .map_err(|err| ApiError::internal(format!("the answer is not JSON: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> GenerationEvent {
        GenerationEvent::Token { text: text.to_owned(), token_id: 7, logprob: None }
    }

    /// A peer that took the request and then sends nothing (hung, paused, cut off): with
    /// heartbeats asked for, its stream fails once silent for the idle timeout, so the
    /// request goes to another replica; without them (an older peer) it is waited for.
    #[tokio::test]
    async fn a_silent_heartbeating_peer_is_taken_as_gone() {
        let idle = Duration::from_millis(200);
        let silent = futures_util::stream::pending::<Result<bytes::Bytes, Infallible>>();
        let mut events = wire_events(silent, Some(idle));
        let started = tokio::time::Instant::now();
        match events.recv().await {
            Some(GenerationEvent::Failed(message)) => assert!(message.contains("taken as gone"), "{message}"),
            other => panic!("want a failure, got {other:?}"),
        }
        assert!(started.elapsed() >= idle, "not before the idle timeout: {:?}", started.elapsed());

        let silent = futures_util::stream::pending::<Result<bytes::Bytes, Infallible>>();
        let mut events = wire_events(silent, None);
        assert!(
            tokio::time::timeout(idle * 3, events.recv()).await.is_err(),
            "without heartbeats nothing is decided on silence"
        );
    }

    /// A replica whose request waits in its queue longer than the idle timeout is kept:
    /// its node's heartbeats show it alive, and they never reach the caller as events.
    #[tokio::test]
    async fn heartbeats_keep_a_queued_remote_request_alive() {
        let (replica, queued) = mpsc::channel(4);
        let heartbeat = Duration::from_millis(20);
        let idle = Duration::from_millis(150);
        let mut events = wire_events(ndjson_events(queued, Some(heartbeat)), Some(idle));
        assert!(tokio::time::timeout(idle * 4, events.recv()).await.is_err(), "nothing arrives while queued");
        replica.send(token("hello")).await.unwrap();
        replica
            .send(GenerationEvent::Done { finish_reason: FinishReason::Stop, prompt_tokens: 3, completion_tokens: 1 })
            .await
            .unwrap();
        drop(replica);
        assert!(matches!(events.recv().await, Some(GenerationEvent::Token { text, .. }) if text == "hello"));
        assert!(matches!(events.recv().await, Some(GenerationEvent::Done { completion_tokens: 1, .. })));
        assert!(events.recv().await.is_none(), "the stream ends with the generation");
    }

    /// Without a heartbeat asked for, the wire carries the events alone (what older
    /// callers parse).
    #[tokio::test]
    async fn no_heartbeats_unless_asked() {
        let (replica, queued) = mpsc::channel(4);
        let lines = ndjson_events(queued, None);
        replica.send(token("a")).await.unwrap();
        drop(replica);
        let lines: Vec<Result<bytes::Bytes, Infallible>> = lines.collect().await;
        let text: Vec<String> =
            lines.into_iter().map(|line| String::from_utf8(line.unwrap().to_vec()).unwrap()).collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(text[0].starts_with(r#"{"event":"token""#), "{text:?}");
    }
}
