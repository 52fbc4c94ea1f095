//! Sign-in through OAuth 2.0 / OpenID Connect providers: the sign-ins on their way through
//! a provider (each spent once by its callback) and the provider accounts linked to users.

use serde::Serialize;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::now_ms;

/// A sign-in that went to a provider and has not come back yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSignIn {
    /// The SHA-256 of the `state` parameter sent to the provider.
    pub state_sha256: String,
    /// The configured provider's name (`[[auth.oauth]] name`).
    pub provider: String,
    pub pkce_verifier: String,
    /// The OpenID Connect nonce the id token must carry (empty for plain OAuth 2.0).
    pub nonce: String,
    /// The redirect URI sent to the provider; the code exchange must send the same.
    pub redirect_uri: String,
    /// Where in the console the browser goes once signed in (a path on this site).
    pub return_to: String,
    pub expires_at_ms: i64,
}

/// A provider account linked to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Identity {
    pub provider: String,
    pub subject: String,
    pub user_id: String,
    pub email: Option<String>,
    pub created_at_ms: i64,
    pub last_sign_in_at_ms: i64,
}

type IdentityRow = (String, String, String, Option<String>, i64, i64);

fn identity_from_row(row: IdentityRow) -> Identity {
    let (provider, subject, user_id, email, created_at_ms, last_sign_in_at_ms) = row;
    Identity { provider, subject, user_id, email, created_at_ms, last_sign_in_at_ms }
}

pub struct Identities<'a> {
    pub(crate) db: &'a Db,
}

impl Identities<'_> {
    /// Records a sign-in on its way to a provider, and forgets expired ones.
    pub async fn begin(&self, pending: &PendingSignIn) -> Result<()> {
        let now = now_ms();
        sqlx::query("DELETE FROM oauth_states WHERE expires_at_ms <= $1").bind(now).execute(self.db.pool()).await?;
        sqlx::query(
            "INSERT INTO oauth_states (state_sha256, provider, pkce_verifier, nonce, redirect_uri, return_to, \
             created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&pending.state_sha256)
        .bind(&pending.provider)
        .bind(&pending.pkce_verifier)
        .bind(&pending.nonce)
        .bind(&pending.redirect_uri)
        .bind(&pending.return_to)
        .bind(now)
        .bind(pending.expires_at_ms)
        .execute(self.db.pool())
        .await
        .map_err(|err| StoreError::conflict_on_unique(err, || "this sign-in state is already in use".into()))?;
        Ok(())
    }

    /// Spends the pending sign-in whose state hashes to `state_sha256`: it is returned
    /// once, if it has not expired, and never again (two racing callbacks get it once).
    pub async fn take(&self, state_sha256: &str) -> Result<Option<PendingSignIn>> {
        let row: Option<(String, String, String, String, String, i64)> = sqlx::query_as(
            "SELECT provider, pkce_verifier, nonce, redirect_uri, return_to, expires_at_ms FROM oauth_states \
             WHERE state_sha256 = $1",
        )
        .bind(state_sha256)
        .fetch_optional(self.db.pool())
        .await?;
        let Some((provider, pkce_verifier, nonce, redirect_uri, return_to, expires_at_ms)) = row else {
            return Ok(None);
        };
        let spent = sqlx::query("DELETE FROM oauth_states WHERE state_sha256 = $1")
            .bind(state_sha256)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        if spent != 1 || expires_at_ms <= now_ms() {
            return Ok(None);
        }
        Ok(Some(PendingSignIn {
            state_sha256: state_sha256.to_owned(),
            provider,
            pkce_verifier,
            nonce,
            redirect_uri,
            return_to,
            expires_at_ms,
        }))
    }

    /// The identity `subject` at `provider`, if it is linked to a user.
    pub async fn find(&self, provider: &str, subject: &str) -> Result<Option<Identity>> {
        let row: Option<IdentityRow> = sqlx::query_as(
            "SELECT provider, subject, user_id, email, created_at_ms, last_sign_in_at_ms FROM user_identities \
             WHERE provider = $1 AND subject = $2",
        )
        .bind(provider)
        .bind(subject)
        .fetch_optional(self.db.pool())
        .await?;
        Ok(row.map(identity_from_row))
    }

    /// Links `subject` at `provider` to `user_id`. A subject links to one user only: a
    /// second link is a conflict.
    pub async fn link(&self, provider: &str, subject: &str, user_id: &str, email: Option<&str>) -> Result<Identity> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO user_identities (provider, subject, user_id, email, created_at_ms, last_sign_in_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(provider)
        .bind(subject)
        .bind(user_id)
        .bind(email)
        .bind(now)
        .execute(self.db.pool())
        .await
        .map_err(|err| {
            StoreError::conflict_on_unique(err, || format!("this {provider} account is already linked to a user"))
        })?;
        self.find(provider, subject)
            .await?
            .ok_or_else(|| StoreError::NotFound { what: "identity", id: format!("{provider}:{subject}") })
    }

    /// Notes a sign-in through a linked identity, with the email the provider gave now.
    pub async fn touch(&self, provider: &str, subject: &str, email: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE user_identities SET last_sign_in_at_ms = $1, email = $2 WHERE provider = $3 AND subject = $4",
        )
        .bind(now_ms())
        .bind(email)
        .bind(provider)
        .bind(subject)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// The provider accounts linked to `user_id`.
    pub async fn for_user(&self, user_id: &str) -> Result<Vec<Identity>> {
        let rows: Vec<IdentityRow> = sqlx::query_as(
            "SELECT provider, subject, user_id, email, created_at_ms, last_sign_in_at_ms FROM user_identities \
             WHERE user_id = $1 ORDER BY provider, subject",
        )
        .bind(user_id)
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows.into_iter().map(identity_from_row).collect())
    }
}
