//! Safety filters: keywords and regular expressions that a request's text (input) or a
//! model's answer (output) must not contain. Rules come from the platform's configuration
//! (`[safety] rules`, every tenant) and from each tenant (`/v1/safety/rules`, kept in the
//! store). A request whose text matches an input rule is refused with a 400 naming the
//! rule's reason; output rules travel with the request to the replica, whose text stream
//! ends before a match with finish reason `content_filter` (as OpenAI reports it).
//!
//! The rules that apply to a caller are compiled once and kept for [`POLICY_TTL`], so the
//! hot path reads no database; a change on this node takes effect at once, a change made
//! on another node within the TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maas_engine::OutputFilter;
use maas_store::TenantScope;
use maas_store::repo::safety::{Direction, RuleKind};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::AppState;

/// How long a caller's compiled rules are reused before they are read again.
pub const POLICY_TTL: Duration = Duration::from_secs(2);

/// A platform-wide rule from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformRule {
    pub direction: Direction,
    pub kind: RuleKind,
    pub pattern: String,
    #[serde(default)]
    pub reason: String,
}

/// Checks that a rule's pattern can be used: a regex must compile and must not match
/// empty text.
pub fn check_pattern(kind: RuleKind, pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("the pattern must not be empty".into());
    }
    if kind == RuleKind::Regex {
        // The engine's own check: what it refuses here it would refuse for every request.
        maas_engine::stream::check_pattern(pattern)?;
    }
    Ok(())
}

struct InputRule {
    matcher: Matcher,
    reason: String,
}

enum Matcher {
    /// Lowercased (ASCII).
    Keyword(String),
    Regex(regex::Regex),
}

/// The compiled rules of one caller.
#[derive(Default)]
pub struct Policy {
    input: Vec<InputRule>,
    /// What the answer must not contain, sent with each generation request.
    pub output: OutputFilter,
}

impl Policy {
    /// Compiles rules (platform rules first). A rule that does not compile (possible only
    /// for rows written before a check) is skipped with a warning, never a failed request.
    fn compile<'a>(rules: impl Iterator<Item = (Direction, RuleKind, &'a str, &'a str)>) -> Policy {
        let mut policy = Policy::default();
        for (direction, kind, pattern, reason) in rules {
            if let Err(err) = check_pattern(kind, pattern) {
                tracing::warn!(%err, "a safety rule is skipped");
                continue;
            }
            if direction.covers_input() {
                let matcher = match kind {
                    RuleKind::Keyword => Matcher::Keyword(pattern.to_ascii_lowercase()),
                    RuleKind::Regex => match regex::Regex::new(pattern) {
                        Ok(regex) => Matcher::Regex(regex),
                        Err(_) => continue,
                    },
                };
                policy.input.push(InputRule { matcher, reason: reason.to_owned() });
            }
            if direction.covers_output() {
                match kind {
                    RuleKind::Keyword => policy.output.keywords.push(pattern.to_owned()),
                    RuleKind::Regex => policy.output.patterns.push(pattern.to_owned()),
                }
            }
        }
        policy
    }

    /// Refuses text that matches an input rule, naming the rule's reason.
    pub fn check_input<'a>(&self, texts: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
        if self.input.is_empty() {
            return Ok(());
        }
        for text in texts {
            let lowered = text.to_ascii_lowercase();
            for rule in &self.input {
                let matched = match &rule.matcher {
                    Matcher::Keyword(keyword) => lowered.contains(keyword.as_str()),
                    Matcher::Regex(regex) => regex.is_match(text),
                };
                if matched {
                    let reason = if rule.reason.is_empty() { "it matches a safety rule" } else { rule.reason.as_str() };
                    return Err(ApiError::bad_request(
                        "content_filter",
                        format!("the request was refused by the safety filter: {reason}"),
                    )
                    .with_param("messages"));
                }
            }
        }
        Ok(())
    }
}

/// Compiled policies by the caller's user id, each with the time it was read.
#[derive(Default)]
pub struct PolicyCache {
    platform: Vec<PlatformRule>,
    entries: Mutex<HashMap<String, (Instant, Arc<Policy>)>>,
}

impl PolicyCache {
    pub fn new(platform: Vec<PlatformRule>) -> Self {
        PolicyCache { platform, entries: Mutex::new(HashMap::new()) }
    }

    /// Forgets every compiled policy (a rule was added or removed on this node).
    pub fn invalidate(&self) {
        self.entries.lock().expect("safety cache lock").clear();
    }

    fn platform_only(&self) -> Policy {
        Policy::compile(self.platform.iter().map(|r| (r.direction, r.kind, r.pattern.as_str(), r.reason.as_str())))
    }
}

/// The policy for `scope`'s requests: the platform's rules and every rule the scope can
/// read. Without a store (a gateway in tests), the platform's rules alone.
pub async fn policy(state: &AppState, scope: Option<&TenantScope>) -> Result<Arc<Policy>, ApiError> {
    let cache = &state.safety;
    let (Some(scope), Some(stores)) = (scope, state.stores.get()) else {
        return Ok(Arc::new(cache.platform_only()));
    };
    if let Some((read_at, policy)) = cache.entries.lock().expect("safety cache lock").get(scope.user_id())
        && read_at.elapsed() < POLICY_TTL
    {
        return Ok(Arc::clone(policy));
    }
    let rules = stores.db.safety_rules().applicable(scope).await?;
    let policy = Arc::new(Policy::compile(
        cache
            .platform
            .iter()
            .map(|r| (r.direction, r.kind, r.pattern.as_str(), r.reason.as_str()))
            .chain(rules.iter().map(|r| (r.direction, r.kind, r.pattern.as_str(), r.reason.as_str()))),
    ));
    cache
        .entries
        .lock()
        .expect("safety cache lock")
        .insert(scope.user_id().to_owned(), (Instant::now(), Arc::clone(&policy)));
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[(Direction, RuleKind, &str, &str)]) -> Policy {
        Policy::compile(rules.iter().map(|&(d, k, p, r)| (d, k, p, r)))
    }

    #[test]
    fn input_rules_refuse_with_their_reason_and_output_rules_become_the_filter() {
        let policy = policy(&[
            (Direction::Input, RuleKind::Keyword, "Secret Plan", "plans stay private"),
            (Direction::Both, RuleKind::Regex, r"\d{17}[\dXx]", ""),
            (Direction::Output, RuleKind::Keyword, "internal", "no internal names"),
        ]);
        let err = policy.check_input(["hello", "about the SECRET plan"]).unwrap_err();
        assert_eq!((err.status, err.code), (http::StatusCode::BAD_REQUEST, "content_filter"));
        assert!(err.message.contains("plans stay private"), "{}", err.message);
        let err = policy.check_input(["id 11010519491231002X"]).unwrap_err();
        assert!(err.message.contains("matches a safety rule"), "{}", err.message);
        assert!(policy.check_input(["an internal memo"]).is_ok(), "output-only rules do not refuse requests");
        assert_eq!(policy.output.keywords, ["internal"]);
        assert_eq!(policy.output.patterns, [r"\d{17}[\dXx]"]);
    }

    #[test]
    fn patterns_are_checked_before_use() {
        assert!(check_pattern(RuleKind::Regex, "(unclosed").unwrap_err().contains("not a valid regular expression"));
        assert!(check_pattern(RuleKind::Keyword, "").is_err());
        assert!(check_pattern(RuleKind::Keyword, "(fine as a keyword").is_ok());
        // A rule that cannot compile (written before the check) is skipped, not fatal.
        let policy = policy(&[(Direction::Both, RuleKind::Regex, "(", "")]);
        assert!(policy.check_input(["("]).is_ok());
        assert!(policy.output.is_empty());
    }
}
