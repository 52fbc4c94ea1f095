//! API keys. A key is owned by a user or an organisation (tenant-owned: listing and
//! revoking go through a [`TenantScope`]); only the SHA-256 of its secret is stored, with
//! a visible prefix so people can tell their keys apart.

use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::quota::QuotaLimits;
use crate::repo::users::Role;
use crate::tenant::{Owner, TenantScope, trusted_sql};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyScope {
    /// The inference API: models, chat, completions, embeddings, files, batches, sessions.
    Inference,
    /// Reading anything the owner may read, changing nothing.
    ReadOnly,
    /// Everything the owner may do.
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub owner: Owner,
    pub created_by: String,
    pub name: String,
    /// The key's first characters, shown in lists (`sk-maas-AbCd1234`).
    pub prefix: String,
    pub scopes: Vec<KeyScope>,
    /// Models the key may call; empty: every model.
    pub allowed_models: Vec<String>,
    pub quota: QuotaLimits,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

/// A key presented by a request, with what authentication needs of its creator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    pub key: ApiKey,
    pub user_role: Role,
    pub user_status: String,
}

#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub prefix: String,
    pub secret_sha256: String,
    pub scopes: Vec<KeyScope>,
    pub allowed_models: Vec<String>,
    pub quota: QuotaLimits,
    pub expires_at_ms: Option<i64>,
}

type KeyRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

const KEY_COLUMNS: &str = "k.id, k.owner_kind, k.owner_id, k.created_by, k.name, k.prefix, k.scopes, \
     k.allowed_models, k.quota, k.created_at_ms, k.expires_at_ms, k.last_used_at_ms, k.revoked_at_ms";

fn key_from_row(row: KeyRow) -> Result<ApiKey> {
    let (id, kind, owner_id, created_by, name, prefix, scopes, models, quota, created, expires, used, revoked) = row;
    let corrupt = |what: &str, err: serde_json::Error| StoreError::InvalidInput(format!("key {id}'s {what}: {err}"));
    Ok(ApiKey {
        owner: Owner::from_columns(&kind, owner_id)?,
        created_by,
        name,
        prefix,
        scopes: serde_json::from_str(&scopes).map_err(|e| corrupt("scopes", e))?,
        allowed_models: serde_json::from_str(&models).map_err(|e| corrupt("allowed models", e))?,
        quota: serde_json::from_str(&quota).map_err(|e| corrupt("quota", e))?,
        created_at_ms: created,
        expires_at_ms: expires,
        last_used_at_ms: used,
        revoked_at_ms: revoked,
        id,
    })
}

pub struct ApiKeys<'a> {
    pub(crate) db: &'a Db,
}

impl ApiKeys<'_> {
    /// Records a key owned by the scope's acting owner. Creating an organisation's key
    /// takes an owner or admin of it.
    pub async fn create(&self, scope: &TenantScope, new: NewKey) -> Result<ApiKey> {
        if new.name.trim().is_empty() || new.name.len() > 100 {
            return Err(StoreError::InvalidInput("a key's name must be 1 to 100 characters".into()));
        }
        if new.scopes.is_empty() {
            return Err(StoreError::InvalidInput("a key needs at least one scope".into()));
        }
        scope.require_org_manager(self.db, "create its keys").await?;
        let key = ApiKey {
            id: new_id("key"),
            owner: scope.acting_as().clone(),
            created_by: scope.user_id().to_owned(),
            name: new.name.trim().to_owned(),
            prefix: new.prefix,
            scopes: new.scopes,
            allowed_models: new.allowed_models,
            quota: new.quota,
            created_at_ms: now_ms(),
            expires_at_ms: new.expires_at_ms,
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, owner_kind, owner_id, created_by, name, prefix, secret_sha256, scopes, \
             allowed_models, quota, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&key.id)
        .bind(key.owner.kind())
        .bind(key.owner.id())
        .bind(&key.created_by)
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(&new.secret_sha256)
        .bind(json(&key.scopes))
        .bind(json(&key.allowed_models))
        .bind(json(&key.quota))
        .bind(key.created_at_ms)
        .bind(key.expires_at_ms)
        .execute(self.db.pool())
        .await?;
        Ok(key)
    }

    /// The key whose secret hashes to `secret_sha256`, whatever its state: the caller
    /// tells a revoked or expired key from an unknown one.
    pub async fn by_secret(&self, secret_sha256: &str) -> Result<Option<KeyIdentity>> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.secret_sha256 = $1");
        let row: Option<KeyRow> =
            sqlx::query_as(trusted_sql(sql)).bind(secret_sha256).fetch_optional(self.db.pool()).await?;
        let Some(row) = row else { return Ok(None) };
        let key = key_from_row(row)?;
        let (role, status): (String, String) = sqlx::query_as("SELECT role, status FROM users WHERE id = $1")
            .bind(&key.created_by)
            .fetch_one(self.db.pool())
            .await?;
        Ok(Some(KeyIdentity { key, user_role: Role::parse(&role)?, user_status: status }))
    }

    /// The keys of the scope's acting owner, newest first (revoked ones included).
    pub async fn list(&self, scope: &TenantScope) -> Result<Vec<ApiKey>> {
        let owner = scope.acting_as();
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.owner_kind = $2 AND k.owner_id = $3 AND {} \
             ORDER BY k.created_at_ms DESC, k.id DESC",
            TenantScope::readable_sql("k", 1)
        );
        let rows: Vec<KeyRow> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            .fetch_all(self.db.pool())
            .await?;
        rows.into_iter().map(key_from_row).collect()
    }

    /// A key the scope may read; another tenant's key is not found.
    pub async fn get(&self, scope: &TenantScope, id: &str) -> Result<ApiKey> {
        let sql =
            format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $2 AND {}", TenantScope::readable_sql("k", 1));
        let row: Option<KeyRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(key_from_row).transpose()?.ok_or_else(|| StoreError::NotFound { what: "api key", id: id.to_owned() })
    }

    /// Revokes a key the scope may change: its own, or its organisations' as an owner or
    /// admin. Revoking twice is not an error.
    pub async fn revoke(&self, scope: &TenantScope, id: &str) -> Result<ApiKey> {
        let key = self.get(scope, id).await?;
        let sql = format!(
            "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $3 AND {}",
            TenantScope::writable_sql("api_keys", 1)
        );
        let updated = sqlx::query(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(now_ms())
            .bind(id)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(StoreError::Forbidden(format!(
                "only the owner, or an owner or admin of its organisation, may revoke key `{id}`"
            )));
        }
        self.get(scope, &key.id).await
    }

    /// Notes that a key was used (at most about once a minute per key is enough).
    pub async fn touch(&self, id: &str, at_ms: i64) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at_ms = $1 WHERE id = $2")
            .bind(at_ms)
            .bind(id)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
