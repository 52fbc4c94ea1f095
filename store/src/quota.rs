//! Quotas and rate limits of API subjects (a user, an org, an API key), and sign-in
//! throttling, counted in this process or in Redis.
//!
//! **Windows.** Request and token limits count in fixed UTC windows: requests per minute in
//! the UTC minute, requests and tokens per day in the UTC day, tokens per month in the UTC
//! calendar month (real month lengths, leap Februaries included). A window's counter starts
//! from zero when the window starts; a refused caller is told the seconds until its window
//! ends. No clock is read here: every call takes `now_ms` (milliseconds since the Unix
//! epoch) from its caller, so tests drive time and the arithmetic in [`window`] and
//! [`decision`] is plain and synchronous.
//!
//! **Atomicity.** [`Limiter::admit`] checks every subject of a request (say its key, its
//! user and its org) and, only if all pass, counts the request and takes a concurrency slot
//! for each, as one indivisible step: under one lock in this process, in one Lua script in
//! Redis. A refused request changes no counter. Concurrent admits therefore never both take
//! the last unit of a request quota.
//!
//! **QUO-1** (a quota is never exceeded by more than the in-flight requests at the moment it
//! ran out). Request and concurrency limits are exact, since they are counted at admission.
//! Tokens are known only when a request ends, so [`Limiter::add_tokens`] adds them
//! afterwards, and admission refuses once the tokens used reach the limit: the requests
//! admitted before that moment may still finish and add theirs, which is the overshoot
//! QUO-1 allows and no more. [`decision::quo1_holds`] is the invariant's predicate.
//!
//! **Concurrency slots** are released when the [`Permit`] is dropped. Each slot also
//! expires [`PERMIT_TTL_MS`] after admission (in Redis, a member of a sorted set scored by
//! its expiry), so the slots of a node that dies while holding them free themselves; a
//! request running longer than that stops counting against the concurrency limit. The
//! in-process backend expires slots the same way, so the two backends agree.
//!
//! Storage bytes and GPU hours are carried in [`QuotaLimits`] so that one struct is the
//! quota, but the limiter does not count them: their owners check them.

pub mod decision;
mod in_process;
mod redis_backend;
pub mod window;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use in_process::LocalState;
use redis_backend::RedisBackend;

/// How long a concurrency slot held in Redis lasts when its permit is never released (the
/// node holding it died): 10 minutes.
pub const PERMIT_TTL_MS: i64 = 10 * 60 * 1000;

/// The newest failures kept per throttled key; a `max_failures` above this never blocks.
pub const FAILURES_KEPT: u32 = 1000;

/// Limits of one subject (a user, an org or an API key); 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaLimits {
    pub requests_per_minute: u64,
    pub requests_per_day: u64,
    pub tokens_per_day: u64,
    pub tokens_per_month: u64,
    /// Not checked by the limiter: the caller checks it against the bytes stored.
    pub storage_bytes: u64,
    pub concurrent_requests: u64,
    /// Not checked by the limiter: the caller checks it against the GPU hours used.
    pub gpu_hours_per_month: u64,
    /// GPU memory (MiB) the subject's private deployments may reserve in all: replicas x
    /// GPUs per replica x memory per GPU. Not checked by the limiter: creating, changing
    /// and scaling a deployment check it.
    pub deployment_gpu_mib: u64,
}

/// One subject to check and its limits, e.g. subject `key:key_0123`, `user:user_abc` or
/// `org:org_x`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCheck {
    pub subject: String,
    pub limits: QuotaLimits,
}

impl QuotaCheck {
    pub fn new(subject: impl Into<String>, limits: QuotaLimits) -> Self {
        QuotaCheck { subject: subject.into(), limits }
    }
}

/// A subject's counters at one instant, as a "my usage" page shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaUsage {
    pub requests_this_minute: u64,
    pub requests_today: u64,
    pub tokens_today: u64,
    pub tokens_this_month: u64,
    pub concurrent_requests: u64,
}

/// The limit that refused a request: which one, of which subject, how far it is used, and
/// how many seconds to wait before trying again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{limit} limit of {subject} reached ({used} of {max}); retry in {retry_after_secs} s")]
pub struct QuotaExceeded {
    pub subject: String,
    /// The field name in [`QuotaLimits`], e.g. `requests_per_minute`.
    pub limit: &'static str,
    pub max: u64,
    pub used: u64,
    pub retry_after_secs: u64,
}

/// The sign-in failures counted for a key, and whether it is blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureStatus {
    /// Failures within the window.
    pub failures: u64,
    /// `Some(seconds until the key unblocks)` while it is blocked.
    pub retry_after_secs: Option<u64>,
}

impl FailureStatus {
    pub fn is_blocked(&self) -> bool {
        self.retry_after_secs.is_some()
    }
}

/// Admits requests against quotas and throttles sign-in failures. Cloning is cheap and
/// clones share the counters.
#[derive(Clone)]
pub struct Limiter {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    InProcess(Arc<Mutex<LocalState>>),
    Redis(Arc<RedisBackend>),
}

impl Limiter {
    /// A limiter whose counters live in this process: right for a single node.
    pub fn in_process() -> Self {
        Limiter { backend: Backend::InProcess(Arc::default()) }
    }

    /// A limiter whose counters live in Redis at `url`, shared by every node, under keys
    /// starting with `key_prefix`. Connects (giving up after about 2 s) and loads the Lua
    /// script; an error names the url (without its password). Needs a single Redis server
    /// or a primary, not Redis Cluster: one request's keys span hash slots.
    pub async fn redis(url: &str, key_prefix: &str) -> Result<Self> {
        let backend = RedisBackend::connect(url, key_prefix).await?;
        Ok(Limiter { backend: Backend::Redis(Arc::new(backend)) })
    }

    /// `in-process` or `redis`, for logs and health pages.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::InProcess(_) => "in-process",
            Backend::Redis(_) => "redis",
        }
    }

    /// Admits a request checked against every subject in `checks`, atomically for all of
    /// them together. It is refused when any subject has reached its requests per minute or
    /// per day, its tokens per day or per month (reached when the tokens used are at or
    /// above the limit), or its concurrent requests. If every check passes, the request is
    /// counted and a concurrency slot taken for every subject, held until the returned
    /// [`Permit`] is dropped. If one fails, nothing changes and the reached limit with the
    /// longest retry-after is returned.
    ///
    /// The outer error is a failure of the backend (Redis unreachable or slow) or a subject
    /// named twice; the inner one is the refusal.
    pub async fn admit(&self, checks: &[QuotaCheck], now_ms: i64) -> Result<Result<Permit, QuotaExceeded>> {
        let mut seen = HashSet::new();
        if let Some(twice) = checks.iter().find(|check| !seen.insert(check.subject.as_str())) {
            return Err(StoreError::InvalidInput(format!(
                "subject `{}` is checked twice in one request; name each subject once",
                twice.subject
            )));
        }
        let subjects: Vec<String> = checks.iter().map(|check| check.subject.clone()).collect();
        let permit_id = uuid::Uuid::new_v4();
        match &self.backend {
            Backend::InProcess(state) => {
                let permit_id = permit_id.as_u128();
                let admitted = lock(state).admit(checks, permit_id, now_ms);
                Ok(admitted.map(|()| Permit {
                    release: Some(Release::InProcess { state: state.clone(), subjects, permit_id }),
                }))
            }
            Backend::Redis(redis) => {
                let permit_id = permit_id.simple().to_string();
                let admitted = redis.admit(checks, &permit_id, now_ms).await?;
                Ok(admitted
                    .map(|()| Permit { release: Some(Release::Redis { backend: redis.clone(), subjects, permit_id }) }))
            }
        }
    }

    /// Adds a finished request's tokens to each subject's counters of the day and of the
    /// month.
    pub async fn add_tokens(&self, subjects: &[String], tokens: u64, now_ms: i64) -> Result<()> {
        if tokens == 0 || subjects.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::InProcess(state) => {
                let mut state = lock(state);
                for subject in subjects {
                    state.add_tokens(subject, tokens, now_ms);
                }
                Ok(())
            }
            Backend::Redis(redis) => redis.add_tokens(subjects, tokens, now_ms).await,
        }
    }

    /// A subject's counters at `now_ms`: requests this minute and today, tokens today and
    /// this month, requests running now.
    pub async fn usage(&self, subject: &str, now_ms: i64) -> Result<QuotaUsage> {
        match &self.backend {
            Backend::InProcess(state) => Ok(lock(state).usage(subject, now_ms)),
            Backend::Redis(redis) => redis.usage(subject, now_ms).await,
        }
    }

    /// Sign-in throttling: the failures recorded for `key` within the last `window_secs`
    /// (a sliding window), and, when `max_failures` or more, the seconds until the key
    /// unblocks. `max_failures` 0 never blocks.
    pub async fn failure_status(
        &self,
        key: &str,
        max_failures: u64,
        window_secs: u64,
        now_ms: i64,
    ) -> Result<FailureStatus> {
        let window_ms = window_ms(window_secs)?;
        match &self.backend {
            Backend::InProcess(state) => Ok(lock(state).failure_status(key, max_failures, window_ms, now_ms)),
            Backend::Redis(redis) => redis.failure_status(key, max_failures, window_ms, now_ms).await,
        }
    }

    /// Records a failed sign-in for `key`; it counts for `window_secs`.
    pub async fn record_failure(&self, key: &str, window_secs: u64, now_ms: i64) -> Result<()> {
        let window_ms = window_ms(window_secs)?;
        match &self.backend {
            Backend::InProcess(state) => {
                lock(state).record_failure(key, window_ms, now_ms);
                Ok(())
            }
            Backend::Redis(redis) => redis.record_failure(key, window_ms, now_ms).await,
        }
    }

    /// Forgets the failures of `key`, e.g. after a successful sign-in.
    pub async fn clear_failures(&self, key: &str) -> Result<()> {
        match &self.backend {
            Backend::InProcess(state) => {
                lock(state).clear_failures(key);
                Ok(())
            }
            Backend::Redis(redis) => redis.clear_failures(key).await,
        }
    }
}

fn window_ms(window_secs: u64) -> Result<i64> {
    match i64::try_from(window_secs).ok().and_then(|secs| secs.checked_mul(1000)) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(StoreError::InvalidInput(format!(
            "a throttling window of {window_secs} s is out of range; use 1 s or more"
        ))),
    }
}

/// The in-process counters stay consistent through a panic elsewhere (each change is one
/// step), so a poisoned lock is taken as it is.
fn lock(state: &Mutex<LocalState>) -> std::sync::MutexGuard<'_, LocalState> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The concurrency slots an admitted request holds, one per subject. Dropping the permit
/// releases them: at once in this process; for Redis in a task spawned on the current
/// Tokio runtime (with no runtime, the slots expire after [`PERMIT_TTL_MS`]).
#[must_use = "dropping the permit releases the request's concurrency slots"]
pub struct Permit {
    release: Option<Release>,
}

enum Release {
    InProcess { state: Arc<Mutex<LocalState>>, subjects: Vec<String>, permit_id: u128 },
    Redis { backend: Arc<RedisBackend>, subjects: Vec<String>, permit_id: String },
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.release.take() {
            Some(Release::InProcess { state, subjects, permit_id }) => {
                let mut state = lock(&state);
                for subject in &subjects {
                    state.release(subject, permit_id);
                }
            }
            Some(Release::Redis { backend, subjects, permit_id }) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { backend.release(&subjects, &permit_id).await });
                } else {
                    tracing::warn!(
                        "a quota permit was dropped outside a tokio runtime; its redis slots expire by themselves"
                    );
                }
            }
            None => {}
        }
    }
}
