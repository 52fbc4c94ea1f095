//! The quota and rate limiter through its public API, each case against both backends: in
//! this process and in a real Redis (`MAAS_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`, a fresh key prefix per test). Covers each limit and its
//! retry-after, atomicity across subjects (a refusal changes nothing), concurrency slots
//! freed by dropping the permit or by expiry, QUO-1 under 50 parallel requests, 0 as
//! unlimited, and sign-in throttling.

use std::time::Duration;

use maas_store::quota::decision::quo1_holds;
use maas_store::quota::{PERMIT_TTL_MS, window::DAY_MS};
use maas_store::{Limiter, Permit, QuotaCheck, QuotaExceeded, QuotaLimits, StoreError};

/// 2024-01-01T00:00:00Z: the tests' clock starts here and moves only when they say so.
const JAN_2024: i64 = 1_704_067_200_000;
const MINUTE_MS: i64 = 60_000;

fn redis_url() -> String {
    std::env::var("MAAS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn in_process() -> Limiter {
    let limiter = Limiter::in_process();
    assert_eq!(limiter.backend_name(), "in-process");
    limiter
}

async fn redis() -> Limiter {
    let prefix = format!("maas-test:{}", uuid::Uuid::now_v7().simple());
    let limiter = Limiter::redis(&redis_url(), &prefix).await.expect("redis is running (see .ci/run)");
    assert_eq!(limiter.backend_name(), "redis");
    limiter
}

/// Runs each named case once against each backend, on a multi-threaded runtime so that
/// parallel tasks really race.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::in_process()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::redis().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    requests_per_minute_refuses_the_61st_until_the_next_minute,
    tokens_per_day_refuse_once_used_and_reopen_the_next_utc_day,
    tokens_count_per_utc_calendar_month,
    a_failing_subject_changes_nothing_for_the_others,
    held_permits_block_and_a_dropped_one_frees_its_slot,
    slots_of_a_lost_permit_expire,
    quo1_exactly_the_request_quota_passes_fifty_parallel_requests,
    quo1_tokens_overshoot_only_by_the_requests_in_flight,
    zero_means_unlimited,
    duplicate_subjects_are_refused_and_change_nothing,
    five_failures_block_until_the_window_passes_or_they_are_cleared,
);

fn limits(edit: impl FnOnce(&mut QuotaLimits)) -> QuotaLimits {
    let mut limits = QuotaLimits::default();
    edit(&mut limits);
    limits
}

async fn admit(limiter: &Limiter, checks: &[QuotaCheck], now_ms: i64) -> Result<Permit, QuotaExceeded> {
    limiter.admit(checks, now_ms).await.expect("the backend answers")
}

/// Polls the subject's concurrent count until it is `expected`: the Redis backend
/// releases a dropped permit in a spawned task. Gives up after about 2 s.
async fn wait_for_concurrent(limiter: &Limiter, subject: &str, expected: u64, now_ms: i64) {
    let mut seen = u64::MAX;
    for _ in 0..200 {
        seen = limiter.usage(subject, now_ms).await.unwrap().concurrent_requests;
        if seen == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{subject} still has {seen} concurrent requests, expected {expected}");
}

async fn requests_per_minute_refuses_the_61st_until_the_next_minute(limiter: Limiter) {
    let checks = [QuotaCheck::new("user:user_abc", limits(|l| l.requests_per_minute = 60))];
    let now_ms = JAN_2024 + 5 * MINUTE_MS + 48_000;
    for n in 1..=60 {
        assert!(admit(&limiter, &checks, now_ms).await.is_ok(), "request {n} of 60");
    }
    let refused = admit(&limiter, &checks, now_ms).await.map(drop).unwrap_err();
    assert_eq!(
        refused,
        QuotaExceeded {
            subject: "user:user_abc".into(),
            limit: "requests_per_minute",
            max: 60,
            used: 60,
            retry_after_secs: 12
        }
    );
    assert_eq!(refused.to_string(), "requests_per_minute limit of user:user_abc reached (60 of 60); retry in 12 s");
    let usage = limiter.usage("user:user_abc", now_ms).await.unwrap();
    assert_eq!((usage.requests_this_minute, usage.requests_today), (60, 60), "the refusal was not counted");
    let next_minute_ms = JAN_2024 + 6 * MINUTE_MS;
    assert!(admit(&limiter, &checks, next_minute_ms).await.is_ok(), "a new minute starts from zero");
    let usage = limiter.usage("user:user_abc", next_minute_ms).await.unwrap();
    assert_eq!((usage.requests_this_minute, usage.requests_today), (1, 61));
}

async fn tokens_per_day_refuse_once_used_and_reopen_the_next_utc_day(limiter: Limiter) {
    let subject = "key:key_0123".to_owned();
    let checks = [QuotaCheck::new(&subject, limits(|l| l.tokens_per_day = 1000))];
    let now_ms = JAN_2024 + 10 * DAY_MS + 20 * 3_600_000; // 20:00 UTC
    drop(admit(&limiter, &checks, now_ms).await.unwrap());
    limiter.add_tokens(std::slice::from_ref(&subject), 999, now_ms).await.unwrap();
    drop(admit(&limiter, &checks, now_ms).await.expect("999 of 1000 tokens used: still admitted"));
    limiter.add_tokens(std::slice::from_ref(&subject), 1, now_ms + 1000).await.unwrap();
    let refused = admit(&limiter, &checks, now_ms + 1000).await.map(drop).unwrap_err();
    assert_eq!((refused.limit, refused.max, refused.used), ("tokens_per_day", 1000, 1000));
    assert_eq!(refused.retry_after_secs, 4 * 3600 - 1, "until midnight UTC");
    let usage = limiter.usage(&subject, now_ms).await.unwrap();
    assert_eq!((usage.requests_today, usage.tokens_today), (2, 1000));
    let next_day_ms = JAN_2024 + 11 * DAY_MS;
    drop(admit(&limiter, &checks, next_day_ms).await.expect("a new day starts from zero"));
    assert_eq!(limiter.usage(&subject, next_day_ms).await.unwrap().tokens_today, 0);
}

async fn tokens_count_per_utc_calendar_month(limiter: Limiter) {
    let subjects = ["org:org_x".to_owned()];
    let checks = [QuotaCheck::new("org:org_x", limits(|l| l.tokens_per_month = 500))];
    let dec_31_ms = JAN_2024 - DAY_MS + 1000; // 2023-12-31T00:00:01Z
    limiter.add_tokens(&subjects, 300, dec_31_ms - 20 * DAY_MS).await.unwrap();
    limiter.add_tokens(&subjects, 200, dec_31_ms).await.unwrap();
    let refused = admit(&limiter, &checks, dec_31_ms).await.map(drop).unwrap_err();
    assert_eq!((refused.limit, refused.used), ("tokens_per_month", 500));
    assert_eq!(refused.retry_after_secs, 86_399, "until 2024-01-01T00:00:00Z");
    let usage = limiter.usage("org:org_x", dec_31_ms).await.unwrap();
    assert_eq!((usage.tokens_today, usage.tokens_this_month), (200, 500));
    drop(admit(&limiter, &checks, JAN_2024).await.expect("january starts from zero"));
}

async fn a_failing_subject_changes_nothing_for_the_others(limiter: Limiter) {
    let now_ms = JAN_2024 + 3 * DAY_MS;
    let org = QuotaCheck::new("org:org_full", limits(|l| l.requests_per_day = 1));
    drop(admit(&limiter, std::slice::from_ref(&org), now_ms).await.unwrap());
    let checks = [
        QuotaCheck::new("key:key_1", limits(|l| l.requests_per_minute = 10)),
        QuotaCheck::new("user:user_1", limits(|l| l.concurrent_requests = 3)),
        org,
    ];
    let refused = admit(&limiter, &checks, now_ms).await.map(drop).unwrap_err();
    assert_eq!((refused.subject.as_str(), refused.limit), ("org:org_full", "requests_per_day"));
    for subject in ["key:key_1", "user:user_1"] {
        let usage = limiter.usage(subject, now_ms).await.unwrap();
        assert_eq!(usage, maas_store::QuotaUsage::default(), "{subject} is untouched");
    }
    let org_usage = limiter.usage("org:org_full", now_ms).await.unwrap();
    assert_eq!((org_usage.requests_today, org_usage.concurrent_requests), (1, 0));
    // Without the full org, the same request passes and counts for both.
    let _permit = admit(&limiter, &checks[..2], now_ms).await.unwrap();
    for subject in ["key:key_1", "user:user_1"] {
        let usage = limiter.usage(subject, now_ms).await.unwrap();
        assert_eq!((usage.requests_this_minute, usage.concurrent_requests), (1, 1), "{subject}");
    }
}

async fn held_permits_block_and_a_dropped_one_frees_its_slot(limiter: Limiter) {
    let now_ms = JAN_2024 + 7 * DAY_MS;
    let checks = [
        QuotaCheck::new("key:key_2", limits(|l| l.concurrent_requests = 2)),
        QuotaCheck::new("org:org_2", QuotaLimits::default()),
    ];
    let first = admit(&limiter, &checks, now_ms).await.unwrap();
    let _second = admit(&limiter, &checks, now_ms).await.unwrap();
    let refused = admit(&limiter, &checks, now_ms).await.map(drop).unwrap_err();
    assert_eq!((refused.limit, refused.used, refused.retry_after_secs), ("concurrent_requests", 2, 1));
    drop(first);
    wait_for_concurrent(&limiter, "key:key_2", 1, now_ms).await;
    wait_for_concurrent(&limiter, "org:org_2", 1, now_ms).await;
    let _third = admit(&limiter, &checks, now_ms).await.expect("the dropped permit's slot is free");
    assert_eq!(limiter.usage("key:key_2", now_ms).await.unwrap().concurrent_requests, 2);
}

async fn slots_of_a_lost_permit_expire(limiter: Limiter) {
    let now_ms = JAN_2024 + 8 * DAY_MS;
    let checks = [QuotaCheck::new("key:key_lost", limits(|l| l.concurrent_requests = 1))];
    // A node that dies never drops its permit.
    std::mem::forget(admit(&limiter, &checks, now_ms).await.unwrap());
    let just_before_ms = now_ms + PERMIT_TTL_MS - 1;
    assert!(admit(&limiter, &checks, just_before_ms).await.is_err(), "the slot is held until it expires");
    let expired_ms = now_ms + PERMIT_TTL_MS;
    assert_eq!(limiter.usage("key:key_lost", expired_ms).await.unwrap().concurrent_requests, 0);
    let _permit = admit(&limiter, &checks, expired_ms).await.expect("the lost slot expired");
}

async fn quo1_exactly_the_request_quota_passes_fifty_parallel_requests(limiter: Limiter) {
    let now_ms = JAN_2024 + 12 * DAY_MS + 1234;
    let checks = vec![
        QuotaCheck::new("key:key_race", limits(|l| l.requests_per_day = 20)),
        QuotaCheck::new("user:user_race", QuotaLimits::default()),
    ];
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (limiter, checks, barrier) = (limiter.clone(), checks.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                limiter.admit(&checks, now_ms).await.expect("the backend answers").is_ok()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += u64::from(task.await.unwrap());
    }
    assert_eq!(admitted, 20, "QUO-1: requests are counted at admission, so none may overshoot");
    let key = limiter.usage("key:key_race", now_ms).await.unwrap();
    let user = limiter.usage("user:user_race", now_ms).await.unwrap();
    assert_eq!((key.requests_today, user.requests_today), (20, 20), "refusals counted nothing");
}

async fn quo1_tokens_overshoot_only_by_the_requests_in_flight(limiter: Limiter) {
    let now_ms = JAN_2024 + 13 * DAY_MS;
    let subjects = ["user:user_tokens".to_owned()];
    let checks = [QuotaCheck::new("user:user_tokens", limits(|l| l.tokens_per_day = 100))];
    // Five requests are admitted before any has used a token; each then uses 40.
    let in_flight: Vec<Permit> = {
        let mut permits = Vec::new();
        for _ in 0..5 {
            permits.push(admit(&limiter, &checks, now_ms).await.unwrap());
        }
        permits
    };
    for permit in in_flight {
        limiter.add_tokens(&subjects, 40, now_ms).await.unwrap();
        drop(permit);
    }
    let used = limiter.usage("user:user_tokens", now_ms).await.unwrap().tokens_today;
    assert_eq!(used, 200);
    assert!(quo1_holds(100, used, 5 * 40), "QUO-1: the overshoot is the in-flight requests' tokens");
    let refused = admit(&limiter, &checks, now_ms).await.map(drop).unwrap_err();
    assert_eq!((refused.limit, refused.used), ("tokens_per_day", 200), "no request starts once spent");
}

async fn zero_means_unlimited(limiter: Limiter) {
    let now_ms = JAN_2024 + 14 * DAY_MS;
    let checks = [QuotaCheck::new("user:user_free", QuotaLimits::default())];
    let subjects = ["user:user_free".to_owned()];
    limiter.add_tokens(&subjects, 1 << 40, now_ms).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(admit(&limiter, &checks, now_ms).await.expect("no limit applies"));
    }
    let usage = limiter.usage("user:user_free", now_ms).await.unwrap();
    assert_eq!((usage.requests_this_minute, usage.concurrent_requests, usage.tokens_today), (300, 300, 1 << 40));
}

async fn duplicate_subjects_are_refused_and_change_nothing(limiter: Limiter) {
    let now_ms = JAN_2024;
    let check = QuotaCheck::new("key:key_twice", QuotaLimits::default());
    let err = limiter.admit(&[check.clone(), check], now_ms).await.map(|_| ()).unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err}");
    assert_eq!(err.to_string(), "subject `key:key_twice` is checked twice in one request; name each subject once");
    assert_eq!(limiter.usage("key:key_twice", now_ms).await.unwrap(), maas_store::QuotaUsage::default());
    let _nothing_to_check = admit(&limiter, &[], now_ms).await.expect("no subject, no limit");
}

async fn five_failures_block_until_the_window_passes_or_they_are_cleared(limiter: Limiter) {
    let key = "signin:alice@example.com";
    let window_secs = 300;
    let start_ms = JAN_2024 + 20 * DAY_MS;
    for n in 0..4 {
        limiter.record_failure(key, window_secs, start_ms + n * 10_000).await.unwrap();
    }
    let status = limiter.failure_status(key, 5, window_secs, start_ms + 40_000).await.unwrap();
    assert_eq!((status.failures, status.is_blocked()), (4, false));
    limiter.record_failure(key, window_secs, start_ms + 40_000).await.unwrap();
    let status = limiter.failure_status(key, 5, window_secs, start_ms + 40_000).await.unwrap();
    assert_eq!((status.failures, status.retry_after_secs), (5, Some(260)), "until the first failure is 300 s old");
    let status = limiter.failure_status(key, 5, window_secs, start_ms + 300_000).await.unwrap();
    assert_eq!((status.failures, status.retry_after_secs), (4, None), "the first failure left the window");
    limiter.record_failure(key, window_secs, start_ms + 300_000).await.unwrap();
    assert!(limiter.failure_status(key, 5, window_secs, start_ms + 300_000).await.unwrap().is_blocked());
    limiter.clear_failures(key).await.unwrap();
    let status = limiter.failure_status(key, 5, window_secs, start_ms + 300_000).await.unwrap();
    assert_eq!((status.failures, status.retry_after_secs), (0, None), "cleared after a good sign-in");
    let other = limiter.failure_status("signin:bob@example.com", 5, window_secs, start_ms).await.unwrap();
    assert_eq!(other.failures, 0, "keys are counted apart");
    let err = limiter.record_failure(key, 0, start_ms).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err}");
}

#[tokio::test]
async fn an_unreachable_redis_is_a_clear_error_naming_the_url() {
    let err = Limiter::redis("redis://:hunter2@127.0.0.1:1/0", "maas-test").await.map(|_| ()).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Redis { .. }), "{message}");
    assert!(message.starts_with("redis at redis://:***@127.0.0.1:1/0: cannot connect"), "{message}");
    assert!(message.contains("check redis.url"), "{message}");
    assert!(!message.contains("hunter2"), "the password stays out of messages: {message}");
    let err = Limiter::redis("http://127.0.0.1:6379", "maas-test").await.map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("the url is not valid"), "{err}");
}

#[tokio::test]
async fn a_permit_dropped_outside_a_runtime_does_not_panic() {
    let limiter = redis().await;
    let checks = [QuotaCheck::new("key:key_orphan", limits(|l| l.concurrent_requests = 1))];
    let permit = admit(&limiter, &checks, JAN_2024).await.unwrap();
    std::thread::spawn(move || drop(permit)).join().expect("drop without a runtime does not panic");
    assert_eq!(
        limiter.usage("key:key_orphan", JAN_2024).await.unwrap().concurrent_requests,
        1,
        "left to expire by itself"
    );
    assert_eq!(limiter.usage("key:key_orphan", JAN_2024 + PERMIT_TTL_MS).await.unwrap().concurrent_requests, 0);
}
