//! Organisations and their members.

use serde::Serialize;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};

/// A member's role inside one organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrgRole {
    Owner,
    Admin,
    Member,
}

impl OrgRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgRole::Owner => "owner",
            OrgRole::Admin => "admin",
            OrgRole::Member => "member",
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "owner" => Ok(OrgRole::Owner),
            "admin" => Ok(OrgRole::Admin),
            "member" => Ok(OrgRole::Member),
            other => Err(StoreError::InvalidInput(format!(
                "unknown organisation role `{other}`: use owner, admin or member"
            ))),
        }
    }

    /// Whether the role manages the organisation (its members, keys and resources).
    pub fn manages(self) -> bool {
        matches!(self, OrgRole::Owner | OrgRole::Admin)
    }
}

/// A member as the organisation's member list shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Member {
    pub user_id: String,
    pub display_name: String,
    pub email: Option<String>,
    pub org_role: OrgRole,
    pub joined_at_ms: i64,
}

/// An organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub display_name: String,
    pub created_at_ms: i64,
}

pub struct Orgs<'a> {
    pub(crate) db: &'a Db,
}

impl Orgs<'_> {
    /// Creates an organisation with `owner_user_id` as its first owner, in one transaction.
    pub async fn create(&self, name: &str, display_name: &str, owner_user_id: &str) -> Result<Org> {
        validate_org_name(name)?;
        let id = new_id("org");
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        sqlx::query("INSERT INTO orgs (id, name, display_name, created_at_ms) VALUES ($1, $2, $3, $4)")
            .bind(&id)
            .bind(name)
            .bind(display_name)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|err| {
                StoreError::conflict_on_unique(err, || format!("an organisation named `{name}` already exists"))
            })?;
        sqlx::query("INSERT INTO org_members (org_id, user_id, org_role, created_at_ms) VALUES ($1, $2, 'owner', $3)")
            .bind(&id)
            .bind(owner_user_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Org { id, name: name.to_owned(), display_name: display_name.to_owned(), created_at_ms: now })
    }

    pub async fn add_member(&self, org_id: &str, user_id: &str, role: OrgRole) -> Result<()> {
        sqlx::query("INSERT INTO org_members (org_id, user_id, org_role, created_at_ms) VALUES ($1, $2, $3, $4)")
            .bind(org_id)
            .bind(user_id)
            .bind(role.as_str())
            .bind(now_ms())
            .execute(self.db.pool())
            .await
            .map_err(|err| {
                StoreError::conflict_on_unique(err, || format!("`{user_id}` is already a member of `{org_id}`"))
            })?;
        Ok(())
    }

    /// The organisations `user_id` belongs to, oldest first.
    pub async fn list_for_user(&self, user_id: &str) -> Result<Vec<Org>> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT o.id, o.name, o.display_name, o.created_at_ms FROM orgs o \
             JOIN org_members m ON m.org_id = o.id WHERE m.user_id = $1 ORDER BY o.created_at_ms, o.id",
        )
        .bind(user_id)
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, display_name, created_at_ms)| Org { id, name, display_name, created_at_ms })
            .collect())
    }
}

impl Orgs<'_> {
    /// `user_id`'s role in the organisation, if a member.
    pub async fn role_of(&self, org_id: &str, user_id: &str) -> Result<Option<OrgRole>> {
        let role: Option<String> =
            sqlx::query_scalar("SELECT org_role FROM org_members WHERE org_id = $1 AND user_id = $2")
                .bind(org_id)
                .bind(user_id)
                .fetch_optional(self.db.pool())
                .await?;
        role.as_deref().map(OrgRole::parse).transpose()
    }

    /// The organisation's members, oldest first.
    pub async fn members(&self, org_id: &str) -> Result<Vec<Member>> {
        let rows: Vec<(String, String, Option<String>, String, i64)> = sqlx::query_as(
            "SELECT u.id, u.display_name, u.email, m.org_role, m.created_at_ms FROM org_members m \
             JOIN users u ON u.id = m.user_id WHERE m.org_id = $1 ORDER BY m.created_at_ms, u.id",
        )
        .bind(org_id)
        .fetch_all(self.db.pool())
        .await?;
        rows.into_iter()
            .map(|(user_id, display_name, email, role, joined_at_ms)| {
                Ok(Member { user_id, display_name, email, org_role: OrgRole::parse(&role)?, joined_at_ms })
            })
            .collect()
    }

    /// Removes a member; the last owner stays (make another owner first).
    pub async fn remove_member(&self, org_id: &str, user_id: &str) -> Result<()> {
        if self.role_of(org_id, user_id).await? == Some(OrgRole::Owner) {
            let owners: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM org_members WHERE org_id = $1 AND org_role = 'owner'")
                    .bind(org_id)
                    .fetch_one(self.db.pool())
                    .await?;
            if owners <= 1 {
                return Err(StoreError::Conflict(
                    "the last owner cannot leave: make another member an owner first".into(),
                ));
            }
        }
        let removed = sqlx::query("DELETE FROM org_members WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        if removed == 0 {
            return Err(StoreError::NotFound { what: "member", id: user_id.to_owned() });
        }
        Ok(())
    }
}

/// Organisation names appear in urls: lowercase letters, digits and dashes, 2 to 64 long.
fn validate_org_name(name: &str) -> Result<()> {
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if (2..=64).contains(&name.len()) && ok_chars && !name.starts_with('-') {
        Ok(())
    } else {
        Err(StoreError::InvalidInput(format!(
            "organisation name `{name}` must be 2 to 64 lowercase letters, digits or dashes, not starting with a dash"
        )))
    }
}
