//! The counters of the in-process backend. The [`super::Limiter`] holds them under one
//! mutex, taken for each whole operation, so a check and its increments are one step.

use std::collections::{HashMap, VecDeque};

use super::window::Window;
use super::{FAILURES_KEPT, FailureStatus, PERMIT_TTL_MS, QuotaCheck, QuotaExceeded, QuotaUsage, decision};

/// Every subject's counters and every throttled key's failures.
#[derive(Default)]
pub(super) struct LocalState {
    subjects: HashMap<String, SubjectCounters>,
    failures: HashMap<String, FailureLog>,
    /// The minute of the last sweep of idle entries; sweeps run at most once a minute.
    swept_minute: Option<i64>,
}

/// A counter of one fixed window. A count from an earlier window reads as zero and is
/// replaced on the next increment, so old windows take no memory.
#[derive(Debug, Clone, Copy, Default)]
struct WindowCount {
    window_id: i64,
    count: u64,
}

impl WindowCount {
    fn in_window(self, window_id: i64) -> u64 {
        // A caller whose clock lags reads (and adds to) the newer window.
        if self.window_id >= window_id { self.count } else { 0 }
    }

    fn add(&mut self, window_id: i64, amount: u64) {
        if self.window_id < window_id {
            *self = WindowCount { window_id, count: 0 };
        }
        self.count = self.count.saturating_add(amount);
    }
}

#[derive(Debug, Default)]
struct SubjectCounters {
    requests_minute: WindowCount,
    requests_day: WindowCount,
    tokens_day: WindowCount,
    tokens_month: WindowCount,
    /// Concurrency slots: permit id to the instant the slot expires if never released,
    /// as in Redis, so both backends count a forgotten or very long request alike.
    slots: HashMap<u128, i64>,
}

impl SubjectCounters {
    fn usage(&self, now_ms: i64) -> QuotaUsage {
        let day = Window::day(now_ms).id;
        QuotaUsage {
            requests_this_minute: self.requests_minute.in_window(Window::minute(now_ms).id),
            requests_today: self.requests_day.in_window(day),
            tokens_today: self.tokens_day.in_window(day),
            tokens_this_month: self.tokens_month.in_window(Window::month(now_ms).id),
            concurrent_requests: self.slots.values().filter(|&&expires_ms| expires_ms > now_ms).count() as u64,
        }
    }
}

/// A key's failure times, oldest first, within the window of its last failure.
#[derive(Debug)]
struct FailureLog {
    times_ms: VecDeque<i64>,
    window_ms: i64,
}

impl LocalState {
    pub(super) fn admit(&mut self, checks: &[QuotaCheck], permit_id: u128, now_ms: i64) -> Result<(), QuotaExceeded> {
        self.sweep(now_ms);
        let usages: Vec<QuotaUsage> = checks.iter().map(|check| self.usage(&check.subject, now_ms)).collect();
        decision::decide(checks, &usages, now_ms)?;
        let (minute, day) = (Window::minute(now_ms).id, Window::day(now_ms).id);
        for check in checks {
            let counters = self.subjects.entry(check.subject.clone()).or_default();
            counters.requests_minute.add(minute, 1);
            counters.requests_day.add(day, 1);
            counters.slots.retain(|_, &mut expires_ms| expires_ms > now_ms);
            counters.slots.insert(permit_id, now_ms.saturating_add(PERMIT_TTL_MS));
        }
        Ok(())
    }

    pub(super) fn release(&mut self, subject: &str, permit_id: u128) {
        if let Some(counters) = self.subjects.get_mut(subject) {
            counters.slots.remove(&permit_id);
        }
    }

    pub(super) fn add_tokens(&mut self, subject: &str, tokens: u64, now_ms: i64) {
        let counters = self.subjects.entry(subject.to_owned()).or_default();
        counters.tokens_day.add(Window::day(now_ms).id, tokens);
        counters.tokens_month.add(Window::month(now_ms).id, tokens);
    }

    pub(super) fn usage(&self, subject: &str, now_ms: i64) -> QuotaUsage {
        self.subjects.get(subject).map(|counters| counters.usage(now_ms)).unwrap_or_default()
    }

    pub(super) fn failure_status(&self, key: &str, max_failures: u64, window_ms: i64, now_ms: i64) -> FailureStatus {
        let times: Vec<i64> =
            self.failures.get(key).map(|log| log.times_ms.iter().copied().collect()).unwrap_or_default();
        decision::failure_status(&times, max_failures, window_ms, now_ms)
    }

    pub(super) fn record_failure(&mut self, key: &str, window_ms: i64, now_ms: i64) {
        self.sweep(now_ms);
        let log =
            self.failures.entry(key.to_owned()).or_insert_with(|| FailureLog { times_ms: VecDeque::new(), window_ms });
        log.window_ms = window_ms;
        let at = log.times_ms.partition_point(|&time| time <= now_ms);
        log.times_ms.insert(at, now_ms);
        let oldest_counted = now_ms.saturating_sub(window_ms);
        while log.times_ms.front().is_some_and(|&time| time <= oldest_counted)
            || log.times_ms.len() as u64 > u64::from(FAILURES_KEPT)
        {
            log.times_ms.pop_front();
        }
    }

    pub(super) fn clear_failures(&mut self, key: &str) {
        self.failures.remove(key);
    }

    /// Drops subjects whose counters are all zero at `now_ms` and keys whose failures have
    /// all left their window, once per minute, so memory stays bounded by the subjects
    /// active this month and the keys that failed recently.
    fn sweep(&mut self, now_ms: i64) {
        let minute = Window::minute(now_ms).id;
        if self.swept_minute.is_some_and(|swept| swept >= minute) {
            return;
        }
        self.swept_minute = Some(minute);
        self.subjects.retain(|_, counters| counters.usage(now_ms) != QuotaUsage::default());
        self.failures
            .retain(|_, log| log.times_ms.back().is_some_and(|&newest| newest > now_ms.saturating_sub(log.window_ms)));
    }

    #[cfg(test)]
    fn entries(&self) -> (usize, usize) {
        (self.subjects.len(), self.failures.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::QuotaLimits;
    use crate::quota::window::{DAY_MS, MINUTE_MS};

    #[test]
    fn idle_subjects_and_stale_failures_are_swept() {
        let start_ms = 1_704_067_200_000; // 2024-01-01
        let mut state = LocalState::default();
        let limits = QuotaLimits { requests_per_minute: 10, ..QuotaLimits::default() };
        for index in 0..100 {
            state.admit(&[QuotaCheck::new(format!("key:{index}"), limits)], index, start_ms).unwrap();
            state.release(&format!("key:{index}"), index);
            state.record_failure(&format!("ip:{index}"), MINUTE_MS, start_ms);
        }
        state.add_tokens("user:busy", 5, start_ms);
        assert_eq!(state.entries(), (101, 100));
        // A day later the request counters are stale, the month's tokens are not.
        state.admit(&[], 0, start_ms + DAY_MS).unwrap();
        assert_eq!(state.entries(), (1, 0));
        assert_eq!(state.usage("user:busy", start_ms + DAY_MS).tokens_this_month, 5);
        state.admit(&[], 0, start_ms + 31 * DAY_MS).unwrap();
        assert_eq!(state.entries(), (0, 0), "a new month forgets the tokens");
    }

    #[test]
    fn a_held_slot_keeps_its_subject_until_it_expires() {
        let start_ms = 1_704_067_200_000;
        let mut state = LocalState::default();
        let limits = QuotaLimits::default();
        state.admit(&[QuotaCheck::new("key:k", limits)], 1, start_ms).unwrap();
        let later_ms = start_ms + PERMIT_TTL_MS - 1;
        state.admit(&[], 0, later_ms).unwrap();
        assert_eq!((state.entries().0, state.usage("key:k", later_ms).concurrent_requests), (1, 1));
        assert_eq!(state.usage("key:k", start_ms + PERMIT_TTL_MS).concurrent_requests, 0, "the forgotten slot expired");
        state.admit(&[], 0, start_ms + DAY_MS).unwrap();
        assert_eq!(state.entries().0, 0, "nothing of the subject is left a day later");
    }

    #[test]
    fn a_key_keeps_only_its_newest_failures() {
        let mut state = LocalState::default();
        for at in 0..i64::from(FAILURES_KEPT) + 50 {
            state.record_failure("ip:1", DAY_MS, at);
        }
        assert_eq!(state.failures["ip:1"].times_ms.len() as u64, u64::from(FAILURES_KEPT));
        assert_eq!(state.failures["ip:1"].times_ms.front(), Some(&50));
    }
}
