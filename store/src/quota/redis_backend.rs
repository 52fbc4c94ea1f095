//! The Redis backend: counters shared by every node. Admission is one Lua script run with
//! EVALSHA, so the check and the increments of all subjects are atomic on the server; the
//! other operations are single commands or MULTI/EXEC pipelines. Every command gives up
//! after [`COMMAND_TIMEOUT`] and its failure names the server.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::window::{DAY_MS, MINUTE_MS, Window};
use super::{FAILURES_KEPT, FailureStatus, PERMIT_TTL_MS, QuotaCheck, QuotaExceeded, QuotaUsage, decision};
use crate::error::{Result, StoreError};

/// How long connecting may take before [`super::Limiter::redis`] gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take before it fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a window's key outlives its window, so a caller whose clock lags a little
/// still finds it.
const MINUTE_KEY_MARGIN_MS: i64 = MINUTE_MS;
const DAY_KEY_MARGIN_MS: i64 = 60 * MINUTE_MS;
const MONTH_KEY_MARGIN_MS: i64 = DAY_MS;

pub(super) struct RedisBackend {
    connection: ConnectionManager,
    /// The url without its password, for messages.
    url: String,
    key_prefix: String,
    admit_script: redis::Script,
}

impl RedisBackend {
    pub(super) async fn connect(url: &str, key_prefix: &str) -> Result<Self> {
        let shown_url = without_password(url);
        let fail = |reason: String| StoreError::Redis { url: shown_url.clone(), reason };
        let client = redis::Client::open(url).map_err(|err| fail(format!("the url is not valid: {err}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1);
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, ConnectionManager::new_with_config(client, config))
            .await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(err)) => {
                return Err(fail(format!("cannot connect ({err}); check redis.url and that the server is running")));
            }
            Err(_) => {
                return Err(fail(format!(
                    "cannot connect within {} s; check redis.url and that the server is running",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let backend = RedisBackend {
            connection,
            url: shown_url,
            key_prefix: key_prefix.to_owned(),
            admit_script: redis::Script::new(include_str!("admit.lua")),
        };
        let mut connection = backend.connection.clone();
        backend
            .run("loading the admit script", backend.admit_script.prepare_invoke().load_async(&mut connection))
            .await?;
        Ok(backend)
    }

    pub(super) async fn admit(
        &self,
        checks: &[QuotaCheck],
        permit_id: &str,
        now_ms: i64,
    ) -> Result<Result<(), QuotaExceeded>> {
        if checks.is_empty() {
            return Ok(Ok(()));
        }
        let mut invocation = self.admit_script.prepare_invoke();
        for check in checks {
            let subject = &check.subject;
            invocation
                .key(self.counter_key("rpm", subject, Window::minute(now_ms)))
                .key(self.counter_key("rpd", subject, Window::day(now_ms)))
                .key(self.counter_key("tpd", subject, Window::day(now_ms)))
                .key(self.counter_key("tpm", subject, Window::month(now_ms)))
                .key(self.slots_key(subject));
        }
        invocation
            .arg(now_ms)
            .arg(permit_id)
            .arg(now_ms.saturating_add(PERMIT_TTL_MS))
            .arg(Window::minute(now_ms).remaining_ms(now_ms) + MINUTE_KEY_MARGIN_MS)
            .arg(Window::day(now_ms).remaining_ms(now_ms) + DAY_KEY_MARGIN_MS)
            .arg(PERMIT_TTL_MS + MINUTE_KEY_MARGIN_MS);
        for check in checks {
            let limits = &check.limits;
            invocation
                .arg(limits.requests_per_minute)
                .arg(limits.requests_per_day)
                .arg(limits.tokens_per_day)
                .arg(limits.tokens_per_month)
                .arg(limits.concurrent_requests);
        }
        let mut connection = self.connection.clone();
        let reply: Vec<u64> = self.run("the admit script", invocation.invoke_async(&mut connection)).await?;
        match reply.split_first() {
            Some((1, [])) => Ok(Ok(())),
            Some((0, counters)) if counters.len() == 5 * checks.len() => {
                let usages: Vec<QuotaUsage> = counters
                    .chunks_exact(5)
                    .map(|used| QuotaUsage {
                        requests_this_minute: used[0],
                        requests_today: used[1],
                        tokens_today: used[2],
                        tokens_this_month: used[3],
                        concurrent_requests: used[4],
                    })
                    .collect();
                match decision::decide(checks, &usages, now_ms) {
                    Err(exceeded) => Ok(Err(exceeded)),
                    Ok(()) => Err(self.error("the admit script refused a request that no limit refuses".into())),
                }
            }
            _ => Err(self.error(format!("the admit script gave an unexpected reply {reply:?}"))),
        }
    }

    pub(super) async fn release(&self, subjects: &[String], permit_id: &str) {
        if subjects.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for subject in subjects {
            pipe.cmd("ZREM").arg(self.slots_key(subject)).arg(permit_id).ignore();
        }
        let mut connection = self.connection.clone();
        if let Err(err) = self.run("releasing a concurrency slot", pipe.query_async::<()>(&mut connection)).await {
            tracing::warn!(%err, "a quota permit was not released; its slots expire by themselves");
        }
    }

    pub(super) async fn add_tokens(&self, subjects: &[String], tokens: u64, now_ms: i64) -> Result<()> {
        let day_ttl_ms = Window::day(now_ms).remaining_ms(now_ms) + DAY_KEY_MARGIN_MS;
        let month_ttl_ms = Window::month(now_ms).remaining_ms(now_ms) + MONTH_KEY_MARGIN_MS;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for subject in subjects {
            for (key, ttl_ms) in [
                (self.counter_key("tpd", subject, Window::day(now_ms)), day_ttl_ms),
                (self.counter_key("tpm", subject, Window::month(now_ms)), month_ttl_ms),
            ] {
                pipe.cmd("INCRBY").arg(&key).arg(tokens).ignore().cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
            }
        }
        let mut connection = self.connection.clone();
        self.run("adding tokens", pipe.query_async::<()>(&mut connection)).await
    }

    pub(super) async fn usage(&self, subject: &str, now_ms: i64) -> Result<QuotaUsage> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(self.counter_key("rpm", subject, Window::minute(now_ms)))
            .cmd("GET")
            .arg(self.counter_key("rpd", subject, Window::day(now_ms)))
            .cmd("GET")
            .arg(self.counter_key("tpd", subject, Window::day(now_ms)))
            .cmd("GET")
            .arg(self.counter_key("tpm", subject, Window::month(now_ms)))
            // Slots whose expiry has passed no longer count (the admit script removes them).
            .cmd("ZCOUNT")
            .arg(self.slots_key(subject))
            .arg(format!("({now_ms}"))
            .arg("+inf");
        let mut connection = self.connection.clone();
        let (rpm, rpd, tpd, tpm, slots): (Option<u64>, Option<u64>, Option<u64>, Option<u64>, u64) =
            self.run("reading quota counters", pipe.query_async(&mut connection)).await?;
        Ok(QuotaUsage {
            requests_this_minute: rpm.unwrap_or(0),
            requests_today: rpd.unwrap_or(0),
            tokens_today: tpd.unwrap_or(0),
            tokens_this_month: tpm.unwrap_or(0),
            concurrent_requests: slots,
        })
    }

    pub(super) async fn failure_status(
        &self,
        key: &str,
        max_failures: u64,
        window_ms: i64,
        now_ms: i64,
    ) -> Result<FailureStatus> {
        let mut command = redis::cmd("ZRANGEBYSCORE");
        command.arg(self.failures_key(key)).arg(format!("({}", now_ms.saturating_sub(window_ms))).arg("+inf");
        let mut connection = self.connection.clone();
        let members: Vec<String> = self.run("reading sign-in failures", command.query_async(&mut connection)).await?;
        // Each member is `<time in ms>:<unique id>`; the time is its score too.
        let times: Vec<i64> =
            members.iter().filter_map(|member| member.split_once(':').and_then(|(at, _)| at.parse().ok())).collect();
        Ok(decision::failure_status(&times, max_failures, window_ms, now_ms))
    }

    pub(super) async fn record_failure(&self, key: &str, window_ms: i64, now_ms: i64) -> Result<()> {
        let key = self.failures_key(key);
        let member = format!("{now_ms}:{}", uuid::Uuid::new_v4().simple());
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(&key)
            .arg(now_ms)
            .arg(member)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_ms.saturating_sub(window_ms))
            .ignore()
            // Keep the newest FAILURES_KEPT, as the in-process backend does.
            .cmd("ZREMRANGEBYRANK")
            .arg(&key)
            .arg(0)
            .arg(-i64::from(FAILURES_KEPT) - 1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window_ms)
            .ignore();
        let mut connection = self.connection.clone();
        self.run("recording a sign-in failure", pipe.query_async::<()>(&mut connection)).await
    }

    pub(super) async fn clear_failures(&self, key: &str) -> Result<()> {
        let mut command = redis::cmd("DEL");
        command.arg(self.failures_key(key));
        let mut connection = self.connection.clone();
        self.run("clearing sign-in failures", command.query_async::<()>(&mut connection)).await
    }

    /// The key of a subject's counter in one window, e.g. `maas:quota:rpm:user:u_1:28401120`.
    fn counter_key(&self, counter: &str, subject: &str, window: Window) -> String {
        format!("{}:quota:{counter}:{subject}:{}", self.key_prefix, window.id)
    }

    fn slots_key(&self, subject: &str) -> String {
        format!("{}:quota:slots:{subject}", self.key_prefix)
    }

    fn failures_key(&self, key: &str) -> String {
        format!("{}:signin-failures:{key}", self.key_prefix)
    }

    async fn run<T>(&self, what: &str, command: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(self.error(format!("{what} failed: {err}"))),
            Err(_) => Err(self.error(format!("{what} timed out after {} ms", COMMAND_TIMEOUT.as_millis()))),
        }
    }

    fn error(&self, reason: String) -> StoreError {
        StoreError::Redis { url: self.url.clone(), reason }
    }
}

/// `url` with the password of its user info replaced by `***`, for messages and logs.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_owned() };
    let user = rest[..at].split_once(':').map_or(&rest[..at], |(user, _)| user);
    format!("{scheme}://{user}:***@{}", &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn urls_lose_their_passwords() {
        let cases = [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
            ("rediss://app:s3cr@t@cache:6380", "rediss://app:***@cache:6380"),
            ("redis://cache/0?x=a@b", "redis://cache/0?x=a@b"),
            ("not a url", "not a url"),
        ];
        for (url, shown) in cases {
            assert_eq!(without_password(url), shown);
        }
    }
}
