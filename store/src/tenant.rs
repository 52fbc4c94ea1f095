//! The tenant scope: who a request acts for. Every query on tenant-owned rows goes
//! through a [`TenantScope`], so TEN-1 ("no request authenticated as one tenant reads or
//! changes another tenant's data") is enforced here once, not route by route.

use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{Result, StoreError};

/// Who owns a resource: a user or an organisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", content = "id", rename_all = "lowercase")]
pub enum Owner {
    User(String),
    Org(String),
}

impl Owner {
    pub fn kind(&self) -> &'static str {
        match self {
            Owner::User(_) => "user",
            Owner::Org(_) => "org",
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Owner::User(id) | Owner::Org(id) => id,
        }
    }

    /// Rebuilds an owner from its `owner_kind` and `owner_id` columns.
    pub(crate) fn from_columns(kind: &str, id: String) -> Result<Self> {
        match kind {
            "user" => Ok(Owner::User(id)),
            "org" => Ok(Owner::Org(id)),
            other => Err(StoreError::InvalidInput(format!("unknown owner kind `{other}` in the database"))),
        }
    }
}

/// A signed-in user acting for themselves or for one of their organisations.
///
/// Only the store builds one, after checking that the user exists and belongs to the
/// organisation; repositories take it by reference and filter every query with
/// [`TenantScope::readable_sql`] or [`TenantScope::writable_sql`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantScope {
    user_id: String,
    acting_as: Owner,
}

impl TenantScope {
    /// Resolves the scope of `user_id` acting as `acting_as` (the user itself when
    /// `None`). Refuses an unknown or disabled user, and an organisation the user is not
    /// a member of.
    pub async fn resolve(db: &Db, user_id: &str, acting_as: Option<Owner>) -> Result<Self> {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(db.pool())
            .await?;
        match status.as_deref() {
            None => {
                return Err(StoreError::NotFound { what: "user", id: user_id.to_owned() });
            }
            Some("disabled") => {
                return Err(StoreError::Forbidden(format!("user `{user_id}` is disabled")));
            }
            Some(_) => {}
        }
        let acting_as = acting_as.unwrap_or_else(|| Owner::User(user_id.to_owned()));
        match &acting_as {
            Owner::User(id) if id == user_id => {}
            Owner::User(id) => {
                return Err(StoreError::Forbidden(format!("user `{user_id}` cannot act as user `{id}`")));
            }
            Owner::Org(org_id) => {
                let member: Option<String> =
                    sqlx::query_scalar("SELECT org_role FROM org_members WHERE org_id = $1 AND user_id = $2")
                        .bind(org_id)
                        .bind(user_id)
                        .fetch_optional(db.pool())
                        .await?;
                if member.is_none() {
                    return Err(StoreError::Forbidden(format!(
                        "user `{user_id}` is not a member of organisation `{org_id}`"
                    )));
                }
            }
        }
        Ok(TenantScope { user_id: user_id.to_owned(), acting_as })
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The owner given to resources created in this scope.
    pub fn acting_as(&self) -> &Owner {
        &self.acting_as
    }

    /// Refuses changing what an organisation owns (creating its keys, adding its models)
    /// unless the user is an owner or admin of it; acting as oneself passes. `what` names
    /// the change in the refusal.
    pub(crate) async fn require_org_manager(&self, db: &Db, what: &str) -> Result<()> {
        let Owner::Org(org_id) = &self.acting_as else { return Ok(()) };
        let role: Option<String> =
            sqlx::query_scalar("SELECT org_role FROM org_members WHERE org_id = $1 AND user_id = $2")
                .bind(org_id)
                .bind(&self.user_id)
                .fetch_optional(db.pool())
                .await?;
        if matches!(role.as_deref(), Some("owner" | "admin")) {
            Ok(())
        } else {
            Err(StoreError::Forbidden(format!("only an owner or admin of organisation `{org_id}` may {what}")))
        }
    }

    /// A SQL predicate admitting rows of `alias` (a table with `owner_kind` and
    /// `owner_id`) that the user may read: their own, and their organisations'.
    /// Bind [`TenantScope::user_id`] as placeholder `$user_param`.
    pub(crate) fn readable_sql(alias: &str, user_param: u8) -> String {
        format!(
            "(({alias}.owner_kind = 'user' AND {alias}.owner_id = ${user_param}) OR \
             ({alias}.owner_kind = 'org' AND {alias}.owner_id IN \
             (SELECT org_id FROM org_members WHERE user_id = ${user_param})))"
        )
    }

    /// Like [`TenantScope::readable_sql`], for changes: the user's own rows, and rows of
    /// organisations where the user is an owner or admin.
    pub(crate) fn writable_sql(alias: &str, user_param: u8) -> String {
        format!(
            "(({alias}.owner_kind = 'user' AND {alias}.owner_id = ${user_param}) OR \
             ({alias}.owner_kind = 'org' AND {alias}.owner_id IN \
             (SELECT org_id FROM org_members WHERE user_id = ${user_param} \
              AND org_role IN ('owner', 'admin'))))"
        )
    }
}

/// Marks SQL text assembled only from this crate's constant fragments (column lists and
/// the scope predicates above), never from input, as safe to run; values are bound.
pub(crate) fn trusted_sql(sql: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql)
}
