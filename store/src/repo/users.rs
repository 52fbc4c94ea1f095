//! Users: the platform's accounts.

use serde::Serialize;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};

/// The id of the node's built-in local user (see [`Users::ensure_local`]).
pub const LOCAL_USER_ID: &str = "user_local";

/// A platform-wide role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Enterprise,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Enterprise => "enterprise",
            Role::User => "user",
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "admin" => Ok(Role::Admin),
            "enterprise" => Ok(Role::Enterprise),
            "user" => Ok(Role::User),
            other => Err(StoreError::InvalidInput(format!("unknown role `{other}`: use admin, enterprise or user"))),
        }
    }
}

/// An account as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct User {
    pub id: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub display_name: String,
    pub role: Role,
    /// `active`, `pending` (not verified yet) or `disabled`.
    pub status: String,
    pub created_at_ms: i64,
}

/// What creating a user takes. At least one of `email` and `phone` is required.
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub email: Option<String>,
    pub phone: Option<String>,
    pub display_name: String,
    pub password_hash: Option<String>,
    pub role: Option<Role>,
    pub active: bool,
}

type UserRow = (String, Option<String>, Option<String>, String, String, String, i64);
/// A user's row and their password hash.
type SignInRow = (String, Option<String>, Option<String>, String, String, String, i64, Option<String>);

fn user_from_row(row: UserRow) -> Result<User> {
    let (id, email, phone, display_name, role, status, created_at_ms) = row;
    Ok(User { id, email, phone, display_name, role: Role::parse(&role)?, status, created_at_ms })
}

pub struct Users<'a> {
    pub(crate) db: &'a Db,
}

impl Users<'_> {
    pub async fn create(&self, new: NewUser) -> Result<User> {
        if new.email.is_none() && new.phone.is_none() {
            return Err(StoreError::InvalidInput("a user needs an email address or a phone number".into()));
        }
        let email = new.email.map(|e| e.trim().to_lowercase());
        let id = new_id("user");
        let now = now_ms();
        let role = new.role.unwrap_or(Role::User);
        let status = if new.active { "active" } else { "pending" };
        sqlx::query(
            "INSERT INTO users (id, email, phone, display_name, password_hash, role, status, \
             created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(&id)
        .bind(&email)
        .bind(&new.phone)
        .bind(&new.display_name)
        .bind(&new.password_hash)
        .bind(role.as_str())
        .bind(status)
        .bind(now)
        .execute(self.db.pool())
        .await
        .map_err(|err| {
            StoreError::conflict_on_unique(err, || "a user with this email or phone already exists".into())
        })?;
        self.get(&id).await
    }

    pub async fn get(&self, id: &str) -> Result<User> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, email, phone, display_name, role, status, created_at_ms FROM users WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        row.map(user_from_row).transpose()?.ok_or_else(|| StoreError::NotFound { what: "user", id: id.to_owned() })
    }

    pub async fn find_by_email(&self, email: &str) -> Result<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, email, phone, display_name, role, status, created_at_ms FROM users WHERE email = $1",
        )
        .bind(email.trim().to_lowercase())
        .fetch_optional(self.db.pool())
        .await?;
        row.map(user_from_row).transpose()
    }

    /// The node's built-in local user (an active admin), created if missing; requests act
    /// as it until accounts and keys exist. Returns its id.
    pub async fn ensure_local(&self) -> Result<String> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO users (id, email, phone, display_name, password_hash, role, status, \
             created_at_ms, updated_at_ms) VALUES ($1, $2, NULL, $3, NULL, 'admin', 'active', $4, $4) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(LOCAL_USER_ID)
        .bind("local@maas.invalid")
        .bind("local operator")
        .bind(now)
        .execute(self.db.pool())
        .await?;
        Ok(LOCAL_USER_ID.to_owned())
    }

    pub async fn count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(self.db.pool()).await?)
    }

    /// The user signing in as `login` (an email address, matched without regard to case,
    /// or a phone number) and their password hash.
    pub async fn find_for_sign_in(&self, login: &str) -> Result<Option<(User, Option<String>)>> {
        let login = login.trim();
        let row: Option<SignInRow> = sqlx::query_as(
            "SELECT id, email, phone, display_name, role, status, created_at_ms, password_hash FROM users \
                 WHERE email = $1 OR phone = $2",
        )
        .bind(login.to_lowercase())
        .bind(login)
        .fetch_optional(self.db.pool())
        .await?;
        let Some((id, email, phone, display_name, role, status, created_at_ms, hash)) = row else {
            return Ok(None);
        };
        Ok(Some((user_from_row((id, email, phone, display_name, role, status, created_at_ms))?, hash)))
    }

    /// Every account, oldest first, for administrators.
    pub async fn list(&self) -> Result<Vec<User>> {
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT id, email, phone, display_name, role, status, created_at_ms FROM users \
             WHERE id <> $1 ORDER BY created_at_ms, id",
        )
        .bind(LOCAL_USER_ID)
        .fetch_all(self.db.pool())
        .await?;
        rows.into_iter().map(user_from_row).collect()
    }

    pub async fn set_password_hash(&self, id: &str, hash: &str) -> Result<()> {
        self.update(id, "password_hash", hash).await
    }

    pub async fn set_role(&self, id: &str, role: Role) -> Result<()> {
        self.update(id, "role", role.as_str()).await
    }

    /// `pending` (not verified yet), `active` or `disabled`.
    pub async fn set_status(&self, id: &str, status: &str) -> Result<()> {
        if !matches!(status, "pending" | "active" | "disabled") {
            return Err(StoreError::InvalidInput(format!("unknown status `{status}`: use active or disabled")));
        }
        self.update(id, "status", status).await
    }

    async fn update(&self, id: &str, column: &'static str, value: &str) -> Result<()> {
        let sql = format!("UPDATE users SET {column} = $1, updated_at_ms = $2 WHERE id = $3");
        let updated = sqlx::query(crate::tenant::trusted_sql(sql))
            .bind(value)
            .bind(now_ms())
            .bind(id)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(StoreError::NotFound { what: "user", id: id.to_owned() });
        }
        Ok(())
    }

    /// How many active administrators there are (besides the built-in local one).
    pub async fn count_admins(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = 'admin' AND status = 'active' AND id <> $1")
            .bind(LOCAL_USER_ID)
            .fetch_one(self.db.pool())
            .await?)
    }
}
