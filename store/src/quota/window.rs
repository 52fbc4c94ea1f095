//! Fixed UTC windows (the minute, the day, the calendar month) computed from a time in
//! milliseconds since the Unix epoch. Pure arithmetic: no clock is read here.
//!
//! The calendar conversions are Howard Hinnant's `days_from_civil` and `civil_from_days`
//! (<https://howardhinnant.github.io/date_algorithms.html>), which are exact for the
//! proleptic Gregorian calendar, leap years included. Arithmetic saturates, so no input
//! panics, however far it lies from today.

/// Milliseconds in a minute.
pub const MINUTE_MS: i64 = 60_000;
/// Milliseconds in a UTC day (UTC days have no leap seconds in Unix time).
pub const DAY_MS: i64 = 86_400_000;

/// One fixed window: an id that is the same for every instant inside it and grows by one
/// from a window to the next, and the instant it ends (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub id: i64,
    pub end_ms: i64,
}

impl Window {
    /// The UTC minute holding `now_ms`; its id counts minutes since the epoch.
    pub fn minute(now_ms: i64) -> Window {
        let id = now_ms.div_euclid(MINUTE_MS);
        Window { id, end_ms: id.saturating_add(1).saturating_mul(MINUTE_MS) }
    }

    /// The UTC day holding `now_ms`; its id counts days since the epoch.
    pub fn day(now_ms: i64) -> Window {
        let id = now_ms.div_euclid(DAY_MS);
        Window { id, end_ms: id.saturating_add(1).saturating_mul(DAY_MS) }
    }

    /// The UTC calendar month holding `now_ms`; its id is `year * 12 + month - 1`, and it
    /// ends at midnight UTC on the first day of the next month.
    pub fn month(now_ms: i64) -> Window {
        let (year, month, _) = civil_from_days(now_ms.div_euclid(DAY_MS));
        let (next_year, next_month) = if month == 12 { (year.saturating_add(1), 1) } else { (year, month + 1) };
        Window {
            id: year.saturating_mul(12).saturating_add(month - 1),
            end_ms: days_from_civil(next_year, next_month, 1).saturating_mul(DAY_MS),
        }
    }

    /// Milliseconds from `now_ms` to the end of the window (0 if it has ended).
    pub fn remaining_ms(&self, now_ms: i64) -> i64 {
        self.end_ms.saturating_sub(now_ms).max(0)
    }

    /// Whole seconds until the window ends, rounded up and at least 1: what a refused
    /// caller is told to wait.
    pub fn retry_after_secs(&self, now_ms: i64) -> u64 {
        ceil_secs(self.remaining_ms(now_ms))
    }
}

/// Milliseconds as whole seconds, rounded up and at least 1.
pub(crate) fn ceil_secs(ms: i64) -> u64 {
    u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000).max(1)
}

/// The day number (days since 1970-01-01) of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year.saturating_sub(1) } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era.saturating_mul(146_097).saturating_add(day_of_era - 719_468)
}

/// The proleptic Gregorian date `(year, month 1..=12, day 1..=31)` of a day number.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days.saturating_add(719_468);
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era.saturating_add(era.saturating_mul(400));
    (if month <= 2 { year.saturating_add(1) } else { year }, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Midnight UTC of some dates, from an independent source (Python's `datetime`).
    const JAN_2024: i64 = 1_704_067_200_000;
    const FEB_2024: i64 = 1_706_745_600_000;
    const MAR_2024: i64 = 1_709_251_200_000;
    const FEB_2023: i64 = 1_675_209_600_000;
    const MAR_2023: i64 = 1_677_628_800_000;
    const JAN_2025: i64 = 1_735_689_600_000;
    const FEB_2000: i64 = 949_363_200_000;
    const MAR_2000: i64 = 951_868_800_000;
    const FEB_2100: i64 = 4_105_123_200_000;
    const MAR_2100: i64 = 4_107_542_400_000;
    const DEC_1969: i64 = -2_678_400_000;

    #[test]
    fn months_end_at_the_first_of_the_next_calendar_month() {
        // (now, the month's end, its length in days, why)
        let cases = [
            (JAN_2024, FEB_2024, 31, "the first instant of a month"),
            (FEB_2024 - 1, FEB_2024, 31, "the last instant of a month"),
            (FEB_2024 + 10 * DAY_MS, MAR_2024, 29, "february of a leap year"),
            (MAR_2024 - 1, MAR_2024, 29, "the last instant of a leap february"),
            (FEB_2023 + 5 * DAY_MS, MAR_2023, 28, "february of a common year"),
            (JAN_2025 - 1, JAN_2025, 31, "december ends in january of the next year"),
            (JAN_2025 - 15 * DAY_MS, JAN_2025, 31, "the middle of december"),
            (FEB_2000 + DAY_MS, MAR_2000, 29, "2000 is a leap year (divisible by 400)"),
            (FEB_2100 + DAY_MS, MAR_2100, 28, "2100 is not (divisible by 100)"),
            (DEC_1969 + DAY_MS, 0, 31, "before the epoch, december 1969 ends at 0"),
        ];
        for (now_ms, end_ms, days, why) in cases {
            let month = Window::month(now_ms);
            assert_eq!(month.end_ms, end_ms, "{why}");
            let previous = Window::month(end_ms - 1);
            assert_eq!(previous, month, "{why}: the last instant is in the same month");
            let start = Window::month(end_ms - days * DAY_MS);
            assert_eq!(start, month, "{why}: the month is {days} days long");
            assert_eq!(
                Window::month(end_ms - days * DAY_MS - 1).id,
                month.id - 1,
                "{why}: the day before is the month before"
            );
            assert_eq!(Window::month(end_ms).id, month.id + 1, "{why}: the next month's id follows");
        }
    }

    #[test]
    fn month_ids_are_year_times_twelve_plus_the_month() {
        assert_eq!(Window::month(JAN_2024).id, 2024 * 12);
        assert_eq!(Window::month(JAN_2025 - 1).id, 2024 * 12 + 11);
        assert_eq!(Window::month(FEB_2000).id, 2000 * 12 + 1);
    }

    #[test]
    fn minutes_and_days_are_fixed_utc_windows() {
        // (window, now, expected id, expected end)
        let cases = [
            (Window::minute(0), 0, 0, MINUTE_MS),
            (Window::minute(MINUTE_MS - 1), MINUTE_MS - 1, 0, MINUTE_MS),
            (Window::minute(MINUTE_MS), MINUTE_MS, 1, 2 * MINUTE_MS),
            (Window::minute(-1), -1, -1, 0),
            (Window::day(JAN_2024 + 5), JAN_2024 + 5, JAN_2024 / DAY_MS, JAN_2024 + DAY_MS),
            (Window::day(JAN_2024 - 1), JAN_2024 - 1, JAN_2024 / DAY_MS - 1, JAN_2024),
            (Window::day(-1), -1, -1, 0),
        ];
        for (window, now_ms, id, end_ms) in cases {
            assert_eq!(window, Window { id, end_ms }, "at {now_ms}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        // (now, window, expected seconds)
        let cases = [
            (0, Window::minute(0), 60),
            (1, Window::minute(1), 60),
            (999, Window::minute(999), 60),
            (1000, Window::minute(1000), 59),
            (MINUTE_MS - 1, Window::minute(MINUTE_MS - 1), 1),
            (JAN_2024 + DAY_MS / 2, Window::day(JAN_2024 + DAY_MS / 2), 43_200),
            (JAN_2025 - 1000, Window::month(JAN_2025 - 1000), 1),
            (FEB_2024, Window::month(FEB_2024), 29 * 86_400),
            (MINUTE_MS + 5, Window::minute(0), 1),
        ];
        for (now_ms, window, secs) in cases {
            assert_eq!(window.retry_after_secs(now_ms), secs, "{window:?} at {now_ms}");
        }
    }

    #[test]
    fn calendar_conversions_round_trip() {
        for days in (-800_000..800_000).step_by(97) {
            let (year, month, day) = civil_from_days(days);
            assert!((1..=12).contains(&month) && (1..=31).contains(&day));
            assert_eq!(days_from_civil(year, month, day), days, "{year}-{month}-{day}");
        }
        assert_eq!(civil_from_days(MAR_2024 / DAY_MS - 1), (2024, 2, 29));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn extreme_times_do_not_panic() {
        for now_ms in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
            let _ = (Window::minute(now_ms), Window::day(now_ms), Window::month(now_ms));
            assert!(Window::month(now_ms).retry_after_secs(now_ms) >= 1);
        }
    }
}
