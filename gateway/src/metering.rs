//! Quotas and usage of inference requests. [`Meter::admit`] checks the caller's quotas
//! (the key's and its owner's: calls per minute and day, tokens per day and month,
//! concurrent requests) in one atomic step and answers 429 with `Retry-After` naming the
//! limit hit. The admitted request's meter records its usage exactly once, when the last
//! holder lets go of it (the answer was sent, the stream ended, or the client went away),
//! and adds its tokens to the token quotas: that is why QUO-1 allows an overshoot of at
//! most the requests in flight when a token quota ran out.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use maas_store::Owner;
use maas_store::quota::Permit;
use maas_store::repo::usage::{NewUsage, UsageKind};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// The status recorded for a request whose client went away before the answer ended.
pub const CLIENT_CLOSED: u16 = 499;

/// A metered request; clones share it, and the last one dropped records the usage.
#[derive(Clone)]
pub struct Meter {
    inner: Arc<MeterInner>,
}

struct MeterInner {
    state: Arc<AppState>,
    /// Whose usage it is, under which endpoint name.
    work: Work,
    model: String,
    started: Instant,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    status: AtomicU16,
    permit: Mutex<Option<Permit>>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").field("model", &self.inner.model).field("endpoint", &self.inner.work.endpoint).finish()
    }
}

/// The 429 of a quota that is used up.
pub fn quota_error(exceeded: &maas_store::quota::QuotaExceeded) -> ApiError {
    ApiError::new(http::StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "quota_exceeded", exceeded.to_string())
        .with_retry_after(exceeded.retry_after_secs)
}

impl Meter {
    /// Admits a request of `caller` to `model` on `endpoint` if every quota allows it.
    pub async fn admit(
        state: &Arc<AppState>,
        caller: &Caller,
        model: &str,
        endpoint: &'static str,
    ) -> Result<Meter, ApiError> {
        caller.check_model(model)?;
        crate::routes::openai::CalledFor::scope(&caller.scope).check(state, model)?;
        let now = maas_store::ids::now_ms();
        let permit = match state.limiter().admit(&caller.quotas, now).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(exceeded)) => {
                metrics::counter!("maas_quota_rejections_total", "limit" => exceeded.limit).increment(1);
                return Err(quota_error(&exceeded));
            }
            Err(err) => {
                tracing::error!(error = %err, "the quota backend failed");
                return Err(ApiError::unavailable(format!(
                    "quotas cannot be checked right now ({err}); retry shortly"
                )));
            }
        };
        Ok(Meter {
            inner: Arc::new(MeterInner {
                state: Arc::clone(state),
                work: Work::for_caller(caller, endpoint),
                model: model.to_owned(),
                started: Instant::now(),
                prompt_tokens: AtomicU64::new(0),
                completion_tokens: AtomicU64::new(0),
                status: AtomicU16::new(CLIENT_CLOSED),
                permit: Mutex::new(Some(permit)),
            }),
        })
    }

    /// The request's final token counts and status.
    pub fn finish(&self, status: u16, prompt_tokens: usize, completion_tokens: usize) {
        self.inner.prompt_tokens.store(prompt_tokens as u64, Ordering::Relaxed);
        self.inner.completion_tokens.store(completion_tokens as u64, Ordering::Relaxed);
        self.inner.status.store(status, Ordering::Relaxed);
    }

    /// A streamed token, counted in case the stream is cut before its usage is known.
    pub fn count_completion_token(&self) {
        self.inner.completion_tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// The request failed with `status` (its tokens so far still count).
    pub fn fail(&self, status: u16) {
        self.inner.status.store(status, Ordering::Relaxed);
    }
}

/// Model work the platform does for a tenant outside a metered request of theirs: the
/// embeddings and graph extraction of a knowledge base's ingestion, and a retrieval's
/// question embedding and condensing. It is recorded as the owner's usage (the caller's
/// and their key's too where a request of theirs caused it), under its own endpoint name,
/// and its tokens count against the same token quotas. It is not admitted against the
/// call quotas: the upload or request that caused it already was.
#[derive(Debug, Clone)]
pub struct Work {
    owner: Owner,
    user_id: String,
    key_id: Option<String>,
    subjects: Vec<String>,
    endpoint: &'static str,
}

impl Work {
    /// Work a request of `caller` causes.
    pub fn for_caller(caller: &Caller, endpoint: &'static str) -> Work {
        Work {
            owner: caller.scope.acting_as().clone(),
            user_id: caller.user_id().to_owned(),
            key_id: caller.key_id().map(str::to_owned),
            subjects: caller.quotas.iter().map(|check| check.subject.clone()).collect(),
            endpoint,
        }
    }

    /// Work done in the background for what `owner` owns (a document's ingestion).
    pub fn for_owner(owner: &Owner, endpoint: &'static str) -> Work {
        Work {
            owner: owner.clone(),
            // An organisation's work is no one member's (as sampled storage).
            user_id: if matches!(owner, Owner::User(_)) { owner.id().to_owned() } else { String::new() },
            key_id: None,
            subjects: vec![format!("{}:{}", owner.kind(), owner.id())],
            endpoint,
        }
    }

    /// The same work, done for `user_id` (and their key): a job they created.
    #[must_use]
    pub fn acting_for(mut self, user_id: &str, key_id: Option<&str>) -> Work {
        user_id.clone_into(&mut self.user_id);
        self.key_id = key_id.map(str::to_owned);
        if let Some(key_id) = key_id {
            self.subjects.push(format!("key:{key_id}"));
        }
        self
    }

    /// Records `gpu_seconds` of training on `model` (a usage record of kind `training`,
    /// costed by the model's GPU-hour price), written at once: the GPU-hours quota reads
    /// it next.
    pub async fn record_gpu_seconds(
        &self,
        state: &AppState,
        model: &str,
        gpu_seconds: u64,
    ) -> Result<(), maas_store::StoreError> {
        let usage = NewUsage {
            owner: self.owner.clone(),
            user_id: self.user_id.clone(),
            key_id: self.key_id.clone(),
            kind: UsageKind::Training,
            model: model.to_owned(),
            endpoint: self.endpoint.to_owned(),
            prompt_tokens: 0,
            completion_tokens: 0,
            gpu_seconds,
            storage_bytes: 0,
            latency_ms: 0,
            status: 200,
            at_ms: maas_store::ids::now_ms(),
        };
        metrics::counter!("maas_usage_gpu_seconds_total", "kind" => "training").increment(gpu_seconds);
        let stores = state.stores().map_err(|e| maas_store::StoreError::InvalidInput(e.message))?;
        stores.db.usage().record(&usage).await
    }

    /// The endpoint name the usage is recorded under.
    pub fn endpoint(&self) -> &'static str {
        self.endpoint
    }

    /// Records `tokens` (prompt, completion) of a call to `model` that began at `started`.
    pub fn record(&self, state: &Arc<AppState>, model: &str, (prompt, completion): (usize, usize), started: Instant) {
        self.record_call(state, model.to_owned(), (prompt as u64, completion as u64), 200, started);
    }

    /// One call's usage: a usage record (written in batches), the deployment's monitoring,
    /// the token counters and the token quotas.
    fn record_call(&self, state: &Arc<AppState>, model: String, tokens: (u64, u64), status: u16, started: Instant) {
        let (prompt_tokens, completion_tokens) = tokens;
        let usage = NewUsage {
            owner: self.owner.clone(),
            user_id: self.user_id.clone(),
            key_id: self.key_id.clone(),
            kind: UsageKind::Inference,
            model,
            endpoint: self.endpoint.to_owned(),
            prompt_tokens,
            completion_tokens,
            gpu_seconds: 0,
            storage_bytes: 0,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            status,
            at_ms: maas_store::ids::now_ms(),
        };
        state.monitor.record_request(
            &usage.model,
            u64::try_from(usage.at_ms).unwrap_or(0),
            status,
            usage.latency_ms,
            tokens,
        );
        metrics::counter!("maas_usage_tokens_total", "kind" => "prompt").increment(prompt_tokens);
        metrics::counter!("maas_usage_tokens_total", "kind" => "completion").increment(completion_tokens);
        add_tokens(state, &self.subjects, prompt_tokens + completion_tokens, usage.at_ms);
        state.usage_writer.record(state, usage);
    }
}

/// Adds `tokens` to the subjects' token quotas, in the background.
fn add_tokens(state: &Arc<AppState>, subjects: &[String], tokens: u64, at_ms: i64) {
    if tokens == 0 || subjects.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let state = Arc::clone(state);
    let subjects = subjects.to_vec();
    runtime.spawn(async move {
        if let Err(err) = state.limiter().add_tokens(&subjects, tokens, at_ms).await {
            tracing::error!(error = %err, "adding tokens to the quotas failed");
        }
    });
}

/// Writes usage records in batches: one transaction per batch (up to [`BATCH`] rows,
/// gathered while the previous one commits), so a busy node does not pay a commit and an
/// fsync per request. Records reach the database within one commit of their request
/// ending; a crash loses at most the batch being gathered.
#[derive(Debug, Default)]
pub struct UsageWriter {
    sender: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<NewUsage>>,
}

/// The most records one transaction writes.
const BATCH: usize = 512;

impl UsageWriter {
    /// Queues a record; the writer task starts with the first one.
    pub fn record(&self, state: &Arc<AppState>, usage: NewUsage) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(model = %usage.model, "a request's usage could not be recorded: no runtime");
            return;
        };
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            runtime.spawn(write_usage(Arc::downgrade(state), receiver));
            sender
        });
        if let Err(err) = sender.send(usage) {
            tracing::error!(model = %err.0.model, "a request's usage could not be recorded: the writer stopped");
        }
    }
}

async fn write_usage(state: std::sync::Weak<AppState>, mut receiver: tokio::sync::mpsc::UnboundedReceiver<NewUsage>) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let Some(state) = state.upgrade() else { return };
        let written = match state.stores() {
            Ok(stores) => stores.db.usage().record_many(&batch).await.map_err(|err| err.to_string()),
            Err(err) => Err(err.message),
        };
        if let Err(err) = written {
            tracing::error!(error = %err, records = batch.len(), "recording usage failed");
        }
        batch.clear();
    }
}

impl Drop for MeterInner {
    fn drop(&mut self) {
        // The concurrency slot is free as soon as the request is over.
        drop(self.permit.lock().map(|mut p| p.take()).unwrap_or_default());
        let prompt_tokens = self.prompt_tokens.load(Ordering::Relaxed);
        let completion_tokens = self.completion_tokens.load(Ordering::Relaxed);
        let status = self.status.load(Ordering::Relaxed);
        let model = std::mem::take(&mut self.model);
        self.work.record_call(&self.state, model, (prompt_tokens, completion_tokens), status, self.started);
    }
}

/// Samples every owner's stored bytes into usage records every `period`, on the node that
/// leads the control plane (one sample per period for the whole cluster).
pub async fn sample_storage(state: Arc<AppState>, period: std::time::Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let leads = state.cluster.get().is_some_and(|handle| {
            let status = handle.status();
            status.leader_id == status.id
        });
        if !leads {
            continue;
        }
        let Ok(stores) = state.stores() else { continue };
        match stores.db.usage().sample_storage(maas_store::ids::now_ms()).await {
            Ok(owners) => tracing::debug!(owners, "storage sampled"),
            Err(err) => tracing::warn!(error = %err, "sampling storage failed"),
        }
    }
}
