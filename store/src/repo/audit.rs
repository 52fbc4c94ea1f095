//! The audit log: who did what, when and from where. Append-only: this repository has no
//! update or delete, and the database's triggers refuse them from anywhere else.

use serde::Serialize;

use crate::db::Db;
use crate::error::Result;
use crate::ids::{new_id, now_ms};

/// One audit-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: String,
    pub at_ms: i64,
    pub actor_user_id: Option<String>,
    pub actor_key_id: Option<String>,
    pub address: String,
    /// A dotted name: `auth.sign_in`, `key.create`, `user.role`, `deployment.delete`.
    pub action: String,
    /// What the action was on (an id or a name).
    pub target: String,
    pub detail: serde_json::Value,
}

/// What a new entry says; the id and time are added when it is written.
#[derive(Debug, Clone, Default)]
pub struct NewAuditEntry {
    pub actor_user_id: Option<String>,
    pub actor_key_id: Option<String>,
    pub address: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

/// Which entries to read; every field narrows.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor_user_id: Option<String>,
    /// Entries whose action starts with this (`key.` for every key action).
    pub action_prefix: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: u32,
}

pub struct AuditLog<'a> {
    pub(crate) db: &'a Db,
}

type AuditRow = (String, i64, Option<String>, Option<String>, String, String, String, String);

impl AuditLog<'_> {
    pub async fn append(&self, entry: NewAuditEntry) -> Result<AuditEntry> {
        let written = AuditEntry {
            id: new_id("audit"),
            at_ms: now_ms(),
            actor_user_id: entry.actor_user_id,
            actor_key_id: entry.actor_key_id,
            address: entry.address,
            action: entry.action,
            target: entry.target,
            detail: entry.detail,
        };
        sqlx::query(
            "INSERT INTO audit_log (id, at_ms, actor_user_id, actor_key_id, address, action, target, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&written.id)
        .bind(written.at_ms)
        .bind(&written.actor_user_id)
        .bind(&written.actor_key_id)
        .bind(&written.address)
        .bind(&written.action)
        .bind(&written.target)
        .bind(written.detail.to_string())
        .execute(self.db.pool())
        .await?;
        Ok(written)
    }

    /// Entries matching `filter`, newest first (at most `filter.limit`, 1 to 1000).
    pub async fn list(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let prefix = filter.action_prefix.as_deref().map(|p| format!("{}%", p.replace(['%', '_'], "")));
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT id, at_ms, actor_user_id, actor_key_id, address, action, target, detail FROM audit_log \
             WHERE ($1 IS NULL OR actor_user_id = $1) AND ($2 IS NULL OR action LIKE $2) AND at_ms >= $3 \
             ORDER BY at_ms DESC, id DESC LIMIT $4",
        )
        .bind(&filter.actor_user_id)
        .bind(&prefix)
        .bind(filter.since_ms.unwrap_or(0))
        .bind(i64::from(filter.limit.clamp(1, 1000)))
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, at_ms, actor_user_id, actor_key_id, address, action, target, detail)| AuditEntry {
                id,
                at_ms,
                actor_user_id,
                actor_key_id,
                address,
                action,
                target,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
            .collect())
    }
}
