//! Sign-in sessions and one-time codes. Only the SHA-256 of a token or code is stored, so
//! a copy of the database does not sign anyone in.

use serde::Serialize;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::repo::users::Role;

/// A signed-in session as the authentication path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIdentity {
    pub session_id: String,
    pub user_id: String,
    pub role: Role,
    pub user_status: String,
    pub expires_at_ms: i64,
}

/// A session as its owner sees it in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub id: String,
    pub address: String,
    pub user_agent: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub revoked: bool,
}

/// What a one-time code is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodePurpose {
    Verify,
    Reset,
}

impl CodePurpose {
    fn as_str(self) -> &'static str {
        match self {
            CodePurpose::Verify => "verify",
            CodePurpose::Reset => "reset",
        }
    }
}

/// Wrong guesses a code survives before it is spent.
pub const MAX_CODE_ATTEMPTS: i64 = 5;

pub struct Credentials<'a> {
    pub(crate) db: &'a Db,
}

impl Credentials<'_> {
    /// Records a session for `user_id` whose token hashes to `token_sha256`.
    pub async fn create_session(
        &self,
        user_id: &str,
        token_sha256: &str,
        address: &str,
        user_agent: &str,
        ttl_ms: i64,
    ) -> Result<SessionInfo> {
        let id = new_id("sess");
        let now = now_ms();
        let user_agent: String = user_agent.chars().take(256).collect();
        sqlx::query(
            "INSERT INTO auth_sessions (id, user_id, token_sha256, address, user_agent, created_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(token_sha256)
        .bind(address)
        .bind(&user_agent)
        .bind(now)
        .bind(now + ttl_ms)
        .execute(self.db.pool())
        .await?;
        Ok(SessionInfo {
            id,
            address: address.to_owned(),
            user_agent,
            created_at_ms: now,
            expires_at_ms: now + ttl_ms,
            revoked: false,
        })
    }

    /// The live (unexpired, unrevoked) session whose token hashes to `token_sha256`.
    pub async fn session_by_token(&self, token_sha256: &str, now_ms: i64) -> Result<Option<SessionIdentity>> {
        let row: Option<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT s.id, s.user_id, u.role, u.status, s.expires_at_ms FROM auth_sessions s \
             JOIN users u ON u.id = s.user_id \
             WHERE s.token_sha256 = $1 AND s.revoked_at_ms IS NULL AND s.expires_at_ms > $2",
        )
        .bind(token_sha256)
        .bind(now_ms)
        .fetch_optional(self.db.pool())
        .await?;
        row.map(|(session_id, user_id, role, user_status, expires_at_ms)| {
            Ok(SessionIdentity { session_id, user_id, role: Role::parse(&role)?, user_status, expires_at_ms })
        })
        .transpose()
    }

    /// The user's sessions, newest first.
    pub async fn list_sessions(&self, user_id: &str) -> Result<Vec<SessionInfo>> {
        let rows: Vec<(String, String, String, i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, address, user_agent, created_at_ms, expires_at_ms, revoked_at_ms FROM auth_sessions \
             WHERE user_id = $1 ORDER BY created_at_ms DESC, id DESC",
        )
        .bind(user_id)
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, address, user_agent, created_at_ms, expires_at_ms, revoked)| SessionInfo {
                id,
                address,
                user_agent,
                created_at_ms,
                expires_at_ms,
                revoked: revoked.is_some(),
            })
            .collect())
    }

    /// Revokes one of the user's sessions; another user's session is not found.
    pub async fn revoke_session(&self, user_id: &str, session_id: &str) -> Result<()> {
        let updated = sqlx::query(
            "UPDATE auth_sessions SET revoked_at_ms = $1 WHERE id = $2 AND user_id = $3 AND revoked_at_ms IS NULL",
        )
        .bind(now_ms())
        .bind(session_id)
        .bind(user_id)
        .execute(self.db.pool())
        .await?
        .rows_affected();
        if updated == 0 {
            return Err(StoreError::NotFound { what: "session", id: session_id.to_owned() });
        }
        Ok(())
    }

    /// Revokes every live session of the user (a password change, a disabled account).
    /// Returns how many were revoked.
    pub async fn revoke_all_sessions(&self, user_id: &str) -> Result<u64> {
        Ok(sqlx::query("UPDATE auth_sessions SET revoked_at_ms = $1 WHERE user_id = $2 AND revoked_at_ms IS NULL")
            .bind(now_ms())
            .bind(user_id)
            .execute(self.db.pool())
            .await?
            .rows_affected())
    }

    /// Issues a code for `purpose`; earlier unused codes of that purpose stop working.
    pub async fn create_code(&self, user_id: &str, purpose: CodePurpose, code_sha256: &str, ttl_ms: i64) -> Result<()> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "UPDATE one_time_codes SET used_at_ms = $1 WHERE user_id = $2 AND purpose = $3 AND used_at_ms IS NULL",
        )
        .bind(now)
        .bind(user_id)
        .bind(purpose.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO one_time_codes (id, user_id, purpose, code_sha256, attempts, created_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4, 0, $5, $6)",
        )
        .bind(new_id("code"))
        .bind(user_id)
        .bind(purpose.as_str())
        .bind(code_sha256)
        .bind(now)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Spends the user's live code for `purpose` if it hashes to `code_sha256`. A wrong
    /// guess counts against the code, which stops working after [`MAX_CODE_ATTEMPTS`].
    pub async fn redeem_code(&self, user_id: &str, purpose: CodePurpose, code_sha256: &str) -> Result<bool> {
        let now = now_ms();
        let row: Option<(String, String, i64)> = sqlx::query_as(
            "SELECT id, code_sha256, attempts FROM one_time_codes WHERE user_id = $1 AND purpose = $2 \
             AND used_at_ms IS NULL AND expires_at_ms > $3 ORDER BY created_at_ms DESC LIMIT 1",
        )
        .bind(user_id)
        .bind(purpose.as_str())
        .bind(now)
        .fetch_optional(self.db.pool())
        .await?;
        let Some((id, expected, attempts)) = row else { return Ok(false) };
        if attempts >= MAX_CODE_ATTEMPTS {
            return Ok(false);
        }
        if expected != code_sha256 {
            sqlx::query("UPDATE one_time_codes SET attempts = attempts + 1 WHERE id = $1")
                .bind(&id)
                .execute(self.db.pool())
                .await?;
            return Ok(false);
        }
        // Only one redemption wins if two race.
        let spent = sqlx::query("UPDATE one_time_codes SET used_at_ms = $1 WHERE id = $2 AND used_at_ms IS NULL")
            .bind(now)
            .bind(&id)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        Ok(spent == 1)
    }

    /// Claims the platform's first administrator for `user_id`; true for exactly one
    /// caller however many race (the claim is a row with a primary key).
    pub async fn claim_first_admin(&self, user_id: &str) -> Result<bool> {
        let claimed = sqlx::query(
            "INSERT INTO platform_settings (key, value, updated_at_ms) VALUES ('first_admin', $1, $2) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(user_id)
        .bind(now_ms())
        .execute(self.db.pool())
        .await?
        .rows_affected();
        Ok(claimed == 1)
    }

    /// Whether anyone has an account yet (the built-in local operator does not count):
    /// the first sign-up becomes the administrator.
    pub async fn has_accounts(&self) -> Result<bool> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id <> $1")
            .bind(crate::repo::users::LOCAL_USER_ID)
            .fetch_one(self.db.pool())
            .await?;
        Ok(count > 0)
    }
}
