//! The response cache: answers of deterministic requests (temperature 0 or a fixed seed,
//! no log-probabilities) are kept and served again without running the model. The key is
//! a SHA-256 over the caller, the endpoint, the deployment's model version and generation,
//! and everything the engine is asked (prompt or messages, sampling, stops, the output
//! filter), so an update of the deployment or of the caller's safety rules misses.
//!
//! Entries live in Redis (`redis.url`, shared by every node, expiring after the TTL) when
//! configured, otherwise in this process (least recently used evicted past
//! `max_entries`). The cache is an optimisation, never a failed request: a Redis that
//! cannot be reached when the cache is first used leaves it in this process (logged), and
//! a command that fails or takes over 200 ms is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maas_engine::{FinishReason, GenerationRequest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;

/// How long a Redis command may take before the cache is skipped for that request.
const REDIS_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseCacheOptions {
    pub enabled: bool,
    /// Entries kept in this process (without Redis).
    pub max_entries: usize,
    pub ttl: Duration,
    /// `redis://...`, or empty for the in-process cache.
    pub redis_url: String,
}

impl Default for ResponseCacheOptions {
    fn default() -> Self {
        ResponseCacheOptions {
            enabled: true,
            max_entries: 10_000,
            ttl: Duration::from_secs(3600),
            redis_url: String::new(),
        }
    }
}

/// A finished answer as the endpoints shape it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Whether a request's answer is the same each time it is asked.
pub fn is_deterministic(request: &GenerationRequest) -> bool {
    request.logprobs.is_none()
        && !request.ignore_eos
        && (request.sampling.temperature == 0.0 || request.sampling.seed.is_some())
}

/// The cache key of a request, or None when its answer may differ each time.
pub fn key(
    caller: &str,
    endpoint: &str,
    deployment: &str,
    request: &GenerationRequest,
    messages: Option<&[maas_engine::ChatMessage]>,
) -> Option<String> {
    if !is_deterministic(request) {
        return None;
    }
    let messages: Option<Vec<(&str, &str)>> =
        messages.map(|list| list.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect());
    let material = serde_json::to_vec(&(1u8, caller, endpoint, deployment, request, messages)).ok()?;
    Some(hex::encode(Sha256::digest(&material)))
}

pub struct ResponseCache {
    options: ResponseCacheOptions,
    local: Mutex<Lru>,
    redis: OnceCell<Option<redis::aio::ConnectionManager>>,
}

impl ResponseCache {
    pub fn new(options: ResponseCacheOptions) -> Self {
        ResponseCache { options, local: Mutex::new(Lru::default()), redis: OnceCell::new() }
    }

    pub fn enabled(&self) -> bool {
        self.options.enabled
    }

    pub fn uses_redis(&self) -> bool {
        !self.options.redis_url.is_empty()
    }

    async fn redis(&self) -> Option<redis::aio::ConnectionManager> {
        if !self.uses_redis() {
            return None;
        }
        self.redis
            .get_or_init(|| async {
                let client = match redis::Client::open(self.options.redis_url.as_str()) {
                    Ok(client) => client,
                    Err(err) => {
                        tracing::warn!(%err, "the response cache cannot use redis.url; caching in this process");
                        return None;
                    }
                };
                match tokio::time::timeout(Duration::from_secs(3), redis::aio::ConnectionManager::new(client)).await {
                    Ok(Ok(manager)) => Some(manager),
                    Ok(Err(err)) => {
                        tracing::warn!(%err, "the response cache cannot reach Redis; caching in this process");
                        None
                    }
                    Err(_) => {
                        tracing::warn!("the response cache timed out connecting to Redis; caching in this process");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    pub async fn get(&self, key: &str) -> Option<CachedAnswer> {
        if !self.options.enabled {
            return None;
        }
        if let Some(mut redis) = self.redis().await {
            let mut command = redis::cmd("GET");
            command.arg(format!("maas:rc:{key}"));
            return match tokio::time::timeout(REDIS_TIMEOUT, command.query_async::<Option<Vec<u8>>>(&mut redis)).await {
                Ok(Ok(Some(bytes))) => serde_json::from_slice(&bytes).ok(),
                Ok(Err(err)) => {
                    tracing::warn!(%err, "response cache: redis GET failed");
                    None
                }
                Ok(Ok(None)) | Err(_) => None,
            };
        }
        self.local.lock().expect("response cache lock").get(key, self.options.ttl)
    }

    pub async fn put(&self, key: String, answer: CachedAnswer) {
        if !self.options.enabled || !matches!(answer.finish_reason, FinishReason::Stop | FinishReason::Length) {
            return;
        }
        if let Some(mut redis) = self.redis().await {
            let Ok(bytes) = serde_json::to_vec(&answer) else { return };
            let mut command = redis::cmd("SET");
            command.arg(format!("maas:rc:{key}")).arg(bytes).arg("EX").arg(self.options.ttl.as_secs().max(1));
            if let Ok(Err(err)) = tokio::time::timeout(REDIS_TIMEOUT, command.query_async::<()>(&mut redis)).await {
                tracing::warn!(%err, "response cache: redis SET failed");
            }
            return;
        }
        self.local.lock().expect("response cache lock").put(key, answer, self.options.max_entries);
    }
}

/// Least-recently-used entries with their insertion time.
#[derive(Default)]
struct Lru {
    entries: HashMap<String, (Instant, u64, Arc<CachedAnswer>)>,
    by_use: BTreeMap<u64, String>,
    tick: u64,
}

impl Lru {
    fn get(&mut self, key: &str, ttl: Duration) -> Option<CachedAnswer> {
        let (stored_at, used, answer) = self.entries.get_mut(key)?;
        if stored_at.elapsed() > ttl {
            let used = *used;
            self.entries.remove(key);
            self.by_use.remove(&used);
            return None;
        }
        self.tick += 1;
        self.by_use.remove(used);
        *used = self.tick;
        self.by_use.insert(self.tick, key.to_owned());
        Some(CachedAnswer::clone(answer))
    }

    fn put(&mut self, key: String, answer: CachedAnswer, max_entries: usize) {
        if max_entries == 0 {
            return;
        }
        self.tick += 1;
        if let Some((_, used, _)) = self.entries.remove(&key) {
            self.by_use.remove(&used);
        }
        while self.entries.len() >= max_entries {
            let Some((_, oldest)) = self.by_use.pop_first() else { break };
            self.entries.remove(&oldest);
        }
        self.by_use.insert(self.tick, key.clone());
        self.entries.insert(key, (Instant::now(), self.tick, Arc::new(answer)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> CachedAnswer {
        CachedAnswer { text: text.into(), finish_reason: FinishReason::Stop, prompt_tokens: 3, completion_tokens: 2 }
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let mut lru = Lru::default();
        let ttl = Duration::from_secs(60);
        lru.put("a".into(), answer("A"), 2);
        lru.put("b".into(), answer("B"), 2);
        assert!(lru.get("a", ttl).is_some());
        lru.put("c".into(), answer("C"), 2);
        assert!(lru.get("b", ttl).is_none(), "b was used least recently");
        assert_eq!(lru.get("a", ttl).map(|a| a.text), Some("A".into()));
        assert_eq!(lru.get("c", ttl).map(|a| a.text), Some("C".into()));
        assert_eq!(lru.entries.len(), lru.by_use.len());
    }

    #[test]
    fn expired_entries_miss() {
        let mut lru = Lru::default();
        lru.put("a".into(), answer("A"), 8);
        assert!(lru.get("a", Duration::ZERO).is_none());
        assert!(lru.entries.is_empty() && lru.by_use.is_empty());
    }

    #[test]
    fn only_deterministic_requests_have_keys() {
        let mut request = GenerationRequest { prompt: "hi".into(), ..GenerationRequest::default() };
        assert!(key("u", "chat", "d", &request, None).is_none(), "temperature 1 without a seed");
        request.sampling.seed = Some(7);
        let seeded = key("u", "chat", "d", &request, None).unwrap();
        request.sampling.seed = None;
        request.sampling.temperature = 0.0;
        let greedy = key("u", "chat", "d", &request, None).unwrap();
        assert_ne!(seeded, greedy);
        assert_ne!(greedy, key("other", "chat", "d", &request, None).unwrap(), "callers do not share entries");
        assert_ne!(greedy, key("u", "chat", "d:2", &request, None).unwrap(), "a new deployment generation misses");
        request.filter.keywords.push("x".into());
        assert_ne!(greedy, key("u", "chat", "d", &request, None).unwrap(), "new safety rules miss");
        request.logprobs = Some(0);
        assert!(key("u", "chat", "d", &request, None).is_none(), "log-probabilities are not cached");
    }
}
