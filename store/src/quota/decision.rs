//! The limiter's decisions as pure functions over counters: whether a request is admitted
//! or which limit refuses it, and whether a sign-in key is throttled. Both backends read
//! their counters and then ask these functions, so they decide alike.

use super::window::{Window, ceil_secs};
use super::{FailureStatus, QuotaCheck, QuotaExceeded, QuotaLimits, QuotaUsage};

/// Every limit of one subject that its counters have reached at `now_ms`, in the order
/// requests per minute, requests per day, tokens per day, tokens per month, concurrent
/// requests. A limit of 0 is unlimited; any other limit is reached when the counter is at
/// or above it (the next request would be one too many, or the tokens are spent).
pub fn reached_limits(subject: &str, limits: &QuotaLimits, usage: &QuotaUsage, now_ms: i64) -> Vec<QuotaExceeded> {
    let minute = Window::minute(now_ms).retry_after_secs(now_ms);
    let day = Window::day(now_ms).retry_after_secs(now_ms);
    let month = Window::month(now_ms).retry_after_secs(now_ms);
    let candidates = [
        ("requests_per_minute", limits.requests_per_minute, usage.requests_this_minute, minute),
        ("requests_per_day", limits.requests_per_day, usage.requests_today, day),
        ("tokens_per_day", limits.tokens_per_day, usage.tokens_today, day),
        ("tokens_per_month", limits.tokens_per_month, usage.tokens_this_month, month),
        // A slot frees when some request ends, which has no window: ask to retry soon.
        ("concurrent_requests", limits.concurrent_requests, usage.concurrent_requests, 1),
    ];
    candidates
        .into_iter()
        .filter(|&(_, max, used, _)| max > 0 && used >= max)
        .map(|(limit, max, used, retry_after_secs)| QuotaExceeded {
            subject: subject.to_owned(),
            limit,
            max,
            used,
            retry_after_secs,
        })
        .collect()
}

/// Decides a request checked against several subjects, given each subject's counters
/// (`usages[i]` belongs to `checks[i]`). Admitted when no subject has reached any limit;
/// otherwise the reached limit with the longest retry-after (the first such one in the
/// order of `checks` and of [`reached_limits`] on a tie), since the request cannot pass
/// before that one clears.
pub fn decide(checks: &[QuotaCheck], usages: &[QuotaUsage], now_ms: i64) -> Result<(), QuotaExceeded> {
    debug_assert_eq!(checks.len(), usages.len(), "one usage per check");
    let mut longest: Option<QuotaExceeded> = None;
    for (check, usage) in checks.iter().zip(usages) {
        for reached in reached_limits(&check.subject, &check.limits, usage, now_ms) {
            if longest.as_ref().is_none_or(|l| reached.retry_after_secs > l.retry_after_secs) {
                longest = Some(reached);
            }
        }
    }
    longest.map_or(Ok(()), Err)
}

/// **QUO-1** as a predicate: a counter that ended at `used` under a limit of `max` (0 is
/// unlimited) kept the invariant when it overshot by no more than what the requests in
/// flight at the moment the quota ran out added (`in_flight_amount`, in the limit's unit).
pub fn quo1_holds(max: u64, used: u64, in_flight_amount: u64) -> bool {
    max == 0 || used <= max.saturating_add(in_flight_amount)
}

/// Sign-in throttling over a sliding window: the failures at `failure_times_ms` (in any
/// order) that happened within the last `window_ms` count; the key is blocked while
/// `max_failures` or more count (`max_failures` 0 never blocks), until enough of them have
/// left the window that one fewer than `max_failures` remain.
pub fn failure_status(failure_times_ms: &[i64], max_failures: u64, window_ms: i64, now_ms: i64) -> FailureStatus {
    let oldest_counted = now_ms.saturating_sub(window_ms);
    let mut counted: Vec<i64> = failure_times_ms.iter().copied().filter(|&at| at > oldest_counted).collect();
    counted.sort_unstable();
    let failures = counted.len() as u64;
    let retry_after_secs = (max_failures > 0 && failures >= max_failures).then(|| {
        // The key unblocks once the failure at this index has left the window.
        let index = usize::try_from(failures - max_failures).unwrap_or(usize::MAX);
        let unblocks_at = counted.get(index).map_or(now_ms, |&at| at.saturating_add(window_ms));
        ceil_secs(unblocks_at.saturating_sub(now_ms))
    });
    FailureStatus { failures, retry_after_secs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::window::DAY_MS;

    const JAN_2024: i64 = 1_704_067_200_000;

    fn check(subject: &str, limits: QuotaLimits) -> QuotaCheck {
        QuotaCheck { subject: subject.into(), limits }
    }

    #[test]
    fn each_limit_refuses_at_its_maximum_and_not_below() {
        let now_ms = JAN_2024 + DAY_MS / 2 + 30_000;
        let limits = QuotaLimits {
            requests_per_minute: 60,
            requests_per_day: 1000,
            tokens_per_day: 5000,
            tokens_per_month: 90_000,
            concurrent_requests: 4,
            ..QuotaLimits::default()
        };
        let below = QuotaUsage {
            requests_this_minute: 59,
            requests_today: 999,
            tokens_today: 4999,
            tokens_this_month: 89_999,
            concurrent_requests: 3,
        };
        // (usage, the limit reached, its retry-after)
        let cases = [
            (QuotaUsage { requests_this_minute: 60, ..below }, "requests_per_minute", 30),
            (QuotaUsage { requests_today: 1000, ..below }, "requests_per_day", 43_170),
            (QuotaUsage { tokens_today: 5000, ..below }, "tokens_per_day", 43_170),
            (QuotaUsage { tokens_today: 7000, ..below }, "tokens_per_day", 43_170),
            (QuotaUsage { tokens_this_month: 90_000, ..below }, "tokens_per_month", 31 * 86_400 - 43_230),
            (QuotaUsage { concurrent_requests: 4, ..below }, "concurrent_requests", 1),
        ];
        let checks = [check("user:u", limits)];
        assert_eq!(decide(&checks, &[below], now_ms), Ok(()));
        for (usage, limit, retry_after_secs) in cases {
            let refused = decide(&checks, &[usage], now_ms).expect_err(limit);
            assert_eq!((refused.limit, refused.retry_after_secs), (limit, retry_after_secs));
            assert_eq!(refused.subject, "user:u");
        }
    }

    #[test]
    fn zero_is_unlimited() {
        let huge = QuotaUsage {
            requests_this_minute: u64::MAX,
            requests_today: u64::MAX,
            tokens_today: u64::MAX,
            tokens_this_month: u64::MAX,
            concurrent_requests: u64::MAX,
        };
        assert_eq!(decide(&[check("org:o", QuotaLimits::default())], &[huge], JAN_2024), Ok(()));
    }

    #[test]
    fn the_longest_retry_after_wins_and_ties_go_to_the_first() {
        let now_ms = JAN_2024 + 1000;
        let tight = QuotaLimits { requests_per_minute: 1, concurrent_requests: 1, ..QuotaLimits::default() };
        let daily = QuotaLimits { requests_per_day: 1, ..QuotaLimits::default() };
        let used =
            QuotaUsage { requests_this_minute: 1, requests_today: 1, concurrent_requests: 1, ..QuotaUsage::default() };
        let refused = decide(&[check("key:k", tight), check("org:o", daily)], &[used, used], now_ms).unwrap_err();
        assert_eq!((refused.subject.as_str(), refused.limit), ("org:o", "requests_per_day"));
        let refused = decide(&[check("key:a", daily), check("key:b", daily)], &[used, used], now_ms).unwrap_err();
        assert_eq!(refused.subject, "key:a", "a tie goes to the first subject");
        let refused = decide(&[check("key:k", tight)], &[used], now_ms).unwrap_err();
        assert_eq!(refused.limit, "requests_per_minute", "59 s beats the 1 s of concurrency");
    }

    #[test]
    fn the_refusal_reads_as_a_sentence() {
        let refused = QuotaExceeded {
            subject: "user:user_abc".into(),
            limit: "requests_per_minute",
            max: 60,
            used: 60,
            retry_after_secs: 12,
        };
        assert_eq!(refused.to_string(), "requests_per_minute limit of user:user_abc reached (60 of 60); retry in 12 s");
    }

    #[test]
    fn failures_block_within_a_sliding_window() {
        let window_ms = 60_000;
        let now_ms = 1_000_000;
        // (failure times, max failures, expected count, expected retry-after)
        let cases: [(&[i64], u64, u64, Option<u64>); 7] = [
            (&[], 5, 0, None),
            (&[now_ms - 1000; 4], 5, 4, None),
            (&[now_ms - 10_000, now_ms - 8000, now_ms - 6000, now_ms - 4000, now_ms - 2000], 5, 5, Some(50)),
            (&[now_ms - 2000, now_ms - 4000, now_ms - 10_000, now_ms - 8000, now_ms - 6000], 5, 5, Some(50)),
            (&[now_ms - 70_000, now_ms - 60_000, now_ms - 1000, now_ms - 1000], 3, 2, None),
            (&[now_ms - 30_000, now_ms - 20_000, now_ms - 10_000, now_ms], 2, 4, Some(50)),
            (&[now_ms; 9], 0, 9, None),
        ];
        for (times, max_failures, failures, retry_after_secs) in cases {
            let status = failure_status(times, max_failures, window_ms, now_ms);
            assert_eq!(status, FailureStatus { failures, retry_after_secs }, "{times:?} max {max_failures}");
        }
    }

    #[test]
    fn quo1_allows_only_the_in_flight_overshoot() {
        assert!(quo1_holds(100, 100, 0));
        assert!(quo1_holds(100, 130, 30));
        assert!(!quo1_holds(100, 131, 30));
        assert!(quo1_holds(0, u64::MAX, 0));
    }
}
