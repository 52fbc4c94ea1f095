//! Safety rules: keywords and regular expressions that a tenant's requests and model
//! answers must not contain. Tenant-owned: every query takes a [`TenantScope`]; the rules
//! that apply to a request are the ones the scope can read (the user's own and those of
//! their organisations).

use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::tenant::{Owner, TenantScope, trusted_sql};

/// What a rule checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The request's prompt or messages.
    Input,
    /// The model's answer.
    Output,
    Both,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
            Direction::Both => "both",
        }
    }

    pub fn covers_input(self) -> bool {
        matches!(self, Direction::Input | Direction::Both)
    }

    pub fn covers_output(self) -> bool {
        matches!(self, Direction::Output | Direction::Both)
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "input" => Ok(Direction::Input),
            "output" => Ok(Direction::Output),
            "both" => Ok(Direction::Both),
            other => Err(StoreError::InvalidInput(format!("unknown rule direction `{other}` in the database"))),
        }
    }
}

/// How a rule's pattern matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// The text, without regard to ASCII case.
    Keyword,
    /// A regular expression (Rust `regex` syntax).
    Regex,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Keyword => "keyword",
            RuleKind::Regex => "regex",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "keyword" => Ok(RuleKind::Keyword),
            "regex" => Ok(RuleKind::Regex),
            other => Err(StoreError::InvalidInput(format!("unknown rule kind `{other}` in the database"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SafetyRule {
    pub id: String,
    pub owner: Owner,
    pub direction: Direction,
    pub kind: RuleKind,
    pub pattern: String,
    pub reason: String,
    pub created_at_ms: i64,
}

/// What creating a rule takes. The caller checks that a regex compiles.
#[derive(Debug, Clone)]
pub struct NewRule {
    pub direction: Direction,
    pub kind: RuleKind,
    pub pattern: String,
    pub reason: String,
}

/// The most rules one owner may have.
pub const MAX_RULES_PER_OWNER: i64 = 1000;

type RuleRow = (String, String, String, String, String, String, String, i64);

const RULE_COLUMNS: &str = "r.id, r.owner_kind, r.owner_id, r.direction, r.kind, r.pattern, r.reason, r.created_at_ms";

fn rule_from_row(row: RuleRow) -> Result<SafetyRule> {
    let (id, owner_kind, owner_id, direction, kind, pattern, reason, created_at_ms) = row;
    Ok(SafetyRule {
        id,
        owner: Owner::from_columns(&owner_kind, owner_id)?,
        direction: Direction::parse(&direction)?,
        kind: RuleKind::parse(&kind)?,
        pattern,
        reason,
        created_at_ms,
    })
}

pub struct SafetyRules<'a> {
    pub(crate) db: &'a Db,
}

impl SafetyRules<'_> {
    /// Adds a rule owned by the scope's acting owner.
    pub async fn create(&self, scope: &TenantScope, new: NewRule) -> Result<SafetyRule> {
        if new.pattern.is_empty() || new.pattern.len() > 1024 {
            return Err(StoreError::InvalidInput("a rule's pattern must be 1 to 1024 bytes long".into()));
        }
        if new.reason.len() > 500 {
            return Err(StoreError::InvalidInput("a rule's reason must be at most 500 bytes long".into()));
        }
        let owner = scope.acting_as().clone();
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM safety_rules WHERE owner_kind = $1 AND owner_id = $2")
                .bind(owner.kind())
                .bind(owner.id())
                .fetch_one(self.db.pool())
                .await?;
        if count >= MAX_RULES_PER_OWNER {
            return Err(StoreError::InvalidInput(format!(
                "an owner may have at most {MAX_RULES_PER_OWNER} safety rules: delete some first"
            )));
        }
        let rule = SafetyRule {
            id: new_id("rule"),
            owner,
            direction: new.direction,
            kind: new.kind,
            pattern: new.pattern,
            reason: new.reason,
            created_at_ms: now_ms(),
        };
        sqlx::query(
            "INSERT INTO safety_rules (id, owner_kind, owner_id, direction, kind, pattern, reason, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&rule.id)
        .bind(rule.owner.kind())
        .bind(rule.owner.id())
        .bind(rule.direction.as_str())
        .bind(rule.kind.as_str())
        .bind(&rule.pattern)
        .bind(&rule.reason)
        .bind(rule.created_at_ms)
        .execute(self.db.pool())
        .await?;
        Ok(rule)
    }

    /// Every rule that applies to the scope's requests (its own and its organisations'),
    /// oldest first.
    pub async fn applicable(&self, scope: &TenantScope) -> Result<Vec<SafetyRule>> {
        let sql = format!(
            "SELECT {RULE_COLUMNS} FROM safety_rules r WHERE {} ORDER BY r.created_at_ms, r.id",
            TenantScope::readable_sql("r", 1)
        );
        let rows: Vec<RuleRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).fetch_all(self.db.pool()).await?;
        rows.into_iter().map(rule_from_row).collect()
    }

    /// A rule the scope may read; another tenant's rule is reported as not found.
    pub async fn get(&self, scope: &TenantScope, id: &str) -> Result<SafetyRule> {
        let sql = format!(
            "SELECT {RULE_COLUMNS} FROM safety_rules r WHERE r.id = $2 AND {}",
            TenantScope::readable_sql("r", 1)
        );
        let row: Option<RuleRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(rule_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "safety rule", id: id.to_owned() })
    }

    /// Deletes a rule the scope may change. Returns the deleted rule.
    pub async fn delete(&self, scope: &TenantScope, id: &str) -> Result<SafetyRule> {
        let rule = self.get(scope, id).await?;
        let sql =
            format!("DELETE FROM safety_rules WHERE id = $2 AND {}", TenantScope::writable_sql("safety_rules", 1));
        let deleted =
            sqlx::query(trusted_sql(sql)).bind(scope.user_id()).bind(id).execute(self.db.pool()).await?.rows_affected();
        if deleted == 0 {
            return Err(StoreError::Forbidden(format!(
                "only the owner, or an owner or admin of its organisation, may delete safety rule `{id}`"
            )));
        }
        Ok(rule)
    }
}
