//! The response cache against a real Redis (started by scripts/test) and in this process:
//! a kept answer comes back, entries are keyed apart, Redis entries expire with the TTL,
//! and a Redis that cannot be reached leaves the answers in this process (never a failed
//! request).

use std::time::Duration;

use maas_engine::{FinishReason, GenerationRequest};
use maas_gateway::response_cache::{CachedAnswer, ResponseCache, ResponseCacheOptions, key};

fn redis_url() -> String {
    std::env::var("MAAS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn answer(text: &str) -> CachedAnswer {
    CachedAnswer { text: text.into(), finish_reason: FinishReason::Stop, prompt_tokens: 5, completion_tokens: 3 }
}

/// A key no other run shares: the caller is a fresh id.
fn fresh_key(prompt: &str) -> String {
    let request = GenerationRequest {
        prompt: prompt.into(),
        sampling: maas_engine::SamplingParams::greedy(),
        ..GenerationRequest::default()
    };
    key(&uuid::Uuid::now_v7().to_string(), "chat", "deployment", &request, None).unwrap()
}

#[tokio::test]
async fn answers_are_kept_in_redis_and_expire() {
    let cache = ResponseCache::new(ResponseCacheOptions {
        ttl: Duration::from_secs(1),
        redis_url: redis_url(),
        ..ResponseCacheOptions::default()
    });
    assert!(cache.uses_redis());
    let (first, second) = (fresh_key("one"), fresh_key("two"));
    assert_eq!(cache.get(&first).await, None);
    cache.put(first.clone(), answer("kept")).await;
    assert_eq!(cache.get(&first).await, Some(answer("kept")));
    assert_eq!(cache.get(&second).await, None, "keys are apart");

    // Another node's cache over the same Redis sees the answer.
    let other = ResponseCache::new(ResponseCacheOptions { redis_url: redis_url(), ..ResponseCacheOptions::default() });
    assert_eq!(other.get(&first).await, Some(answer("kept")));

    // Cut or filtered answers are not kept.
    let cut = CachedAnswer { finish_reason: FinishReason::ContentFilter, ..answer("cut") };
    cache.put(second.clone(), cut).await;
    assert_eq!(cache.get(&second).await, None);

    // Redis expires the entry after the TTL: wait on the event, polling Redis itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cache.get(&first).await.is_some() {
        assert!(std::time::Instant::now() < deadline, "the entry outlived its TTL of 1 s by 9 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_unreachable_redis_falls_back_to_this_process() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    drop(listener);
    let cache = ResponseCache::new(ResponseCacheOptions { redis_url: url, ..ResponseCacheOptions::default() });
    let key = fresh_key("unreachable");
    cache.put(key.clone(), answer("nowhere")).await;
    assert_eq!(cache.get(&key).await, Some(answer("nowhere")), "kept in this process instead, and no error");
}

#[tokio::test]
async fn answers_are_kept_in_this_process_without_redis() {
    let cache = ResponseCache::new(ResponseCacheOptions::default());
    assert!(!cache.uses_redis());
    let key = fresh_key("local");
    cache.put(key.clone(), answer("local")).await;
    assert_eq!(cache.get(&key).await, Some(answer("local")));
    let off = ResponseCache::new(ResponseCacheOptions { enabled: false, ..ResponseCacheOptions::default() });
    off.put(key.clone(), answer("local")).await;
    assert_eq!(off.get(&key).await, None, "a disabled cache keeps nothing");
}
