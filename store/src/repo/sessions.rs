//! Chat sessions: a conversation with one model that keeps its messages across turns
//! (migration 0004). The rows are tenant-owned: every query takes a [`TenantScope`], and
//! another tenant's session is reported as not found (TEN-1).
//!
//! Messages are numbered from 1 by `seq`. A turn is appended as one transaction (the
//! user's message and the assistant's reply together), so a session never holds a
//! question without its answer's row, even when the answer was cut short (its
//! `finish_reason` then says `cancelled` or `failed`).

use serde::Serialize;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::tenant::{Owner, TenantScope, trusted_sql};

/// The longest title kept; a title taken from the first message is cut to it.
pub const MAX_TITLE_CHARS: usize = 80;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatSession {
    pub id: String,
    pub owner: Owner,
    /// The deployment the session talks to.
    pub model: String,
    pub system_prompt: Option<String>,
    /// The session's sampling settings (OpenAI's field names), checked by the gateway.
    pub sampling: serde_json::Value,
    pub title: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct NewChatSession {
    pub model: String,
    pub system_prompt: Option<String>,
    pub sampling: serde_json::Value,
    pub title: Option<String>,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    User,
    Assistant,
}

impl MessageRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::User => "user",
            MessageRole::Assistant => "assistant",
        }
    }

    fn from_column(role: &str) -> Result<Self> {
        match role {
            "user" => Ok(MessageRole::User),
            "assistant" => Ok(MessageRole::Assistant),
            other => Err(StoreError::InvalidInput(format!("unknown message role `{other}` in the database"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionMessage {
    pub seq: i64,
    pub role: MessageRole,
    pub content: String,
    /// How an assistant reply ended: `stop`, `length`, `cancelled` or `failed`; `None`
    /// for user messages.
    pub finish_reason: Option<String>,
    /// Why a `failed` reply failed.
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub created_at_ms: i64,
}

/// A message to append; `seq` and the time are given by [`Sessions::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSessionMessage {
    pub role: MessageRole,
    pub content: String,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
}

const FINISH_REASONS: [&str; 5] = ["stop", "length", "cancelled", "failed", "content_filter"];

type SessionRow = (String, String, String, String, Option<String>, String, Option<String>, i64, i64);

const SESSION_COLUMNS: &str = "s.id, s.owner_kind, s.owner_id, s.model, s.system_prompt, s.sampling_json, s.title, \
                               s.created_at_ms, s.updated_at_ms";

fn session_from_row(row: SessionRow) -> Result<ChatSession> {
    let (id, owner_kind, owner_id, model, system_prompt, sampling_json, title, created_at_ms, updated_at_ms) = row;
    let sampling = serde_json::from_str(&sampling_json)
        .map_err(|e| StoreError::InvalidInput(format!("session `{id}` has unreadable sampling settings: {e}")))?;
    Ok(ChatSession {
        owner: Owner::from_columns(&owner_kind, owner_id)?,
        id,
        model,
        system_prompt,
        sampling,
        title,
        created_at_ms,
        updated_at_ms,
    })
}

type MessageRow = (i64, String, String, Option<String>, Option<String>, Option<i64>, Option<i64>, i64);

fn message_from_row(row: MessageRow) -> Result<SessionMessage> {
    let (seq, role, content, finish_reason, error, prompt_tokens, completion_tokens, created_at_ms) = row;
    Ok(SessionMessage {
        seq,
        role: MessageRole::from_column(&role)?,
        content,
        finish_reason,
        error,
        prompt_tokens,
        completion_tokens,
        created_at_ms,
    })
}

/// A title from the first user message: its first line, cut to [`MAX_TITLE_CHARS`].
fn title_from(content: &str) -> Option<String> {
    let line = content.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(MAX_TITLE_CHARS).collect())
}

pub struct Sessions<'a> {
    pub(crate) db: &'a Db,
}

impl Sessions<'_> {
    /// Creates a session owned by the scope's acting owner.
    pub async fn create(&self, scope: &TenantScope, new: NewChatSession) -> Result<ChatSession> {
        if new.model.is_empty() {
            return Err(StoreError::InvalidInput("a session needs a model".into()));
        }
        if !new.sampling.is_object() {
            return Err(StoreError::InvalidInput("a session's sampling settings must be a JSON object".into()));
        }
        let now = now_ms();
        let session = ChatSession {
            id: new_id("sess"),
            owner: scope.acting_as().clone(),
            model: new.model,
            system_prompt: new.system_prompt,
            sampling: new.sampling,
            title: new.title.map(|t| t.chars().take(MAX_TITLE_CHARS).collect()),
            created_at_ms: now,
            updated_at_ms: now,
        };
        sqlx::query(
            "INSERT INTO chat_sessions (id, owner_kind, owner_id, model, system_prompt, sampling_json, title, \
             created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&session.id)
        .bind(session.owner.kind())
        .bind(session.owner.id())
        .bind(&session.model)
        .bind(&session.system_prompt)
        .bind(session.sampling.to_string())
        .bind(&session.title)
        .bind(session.created_at_ms)
        .bind(session.updated_at_ms)
        .execute(self.db.pool())
        .await?;
        Ok(session)
    }

    /// A session the scope may read; another tenant's is reported as not found, so ids do
    /// not leak across tenants.
    pub async fn get(&self, scope: &TenantScope, id: &str) -> Result<ChatSession> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions s WHERE s.id = $2 AND {}",
            TenantScope::readable_sql("s", 1)
        );
        let row: Option<SessionRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(session_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "session", id: id.to_owned() })
    }

    /// The sessions of the scope's acting owner, most recently used first.
    pub async fn list(&self, scope: &TenantScope) -> Result<Vec<ChatSession>> {
        let owner = scope.acting_as();
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions s WHERE s.owner_kind = $2 AND s.owner_id = $3 AND {} \
             ORDER BY s.updated_at_ms DESC, s.id DESC",
            TenantScope::readable_sql("s", 1)
        );
        let rows: Vec<SessionRow> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            .fetch_all(self.db.pool())
            .await?;
        rows.into_iter().map(session_from_row).collect()
    }

    /// A session's messages in order, for a scope that may read it.
    pub async fn messages(&self, scope: &TenantScope, id: &str) -> Result<Vec<SessionMessage>> {
        self.get(scope, id).await?;
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT seq, role, content, finish_reason, error, prompt_tokens, completion_tokens, created_at_ms \
             FROM chat_session_messages WHERE session_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.db.pool())
        .await?;
        rows.into_iter().map(message_from_row).collect()
    }

    /// Appends `messages` after the session's last one, in one transaction, for a scope
    /// that may change the session; the session's first user message becomes its title
    /// when it has none. Returns the stored messages. A refused append stores nothing.
    pub async fn append(
        &self,
        scope: &TenantScope,
        id: &str,
        messages: Vec<NewSessionMessage>,
    ) -> Result<Vec<SessionMessage>> {
        for message in &messages {
            match (message.role, message.finish_reason.as_deref()) {
                (MessageRole::User, None) => {}
                (MessageRole::User, Some(_)) => {
                    return Err(StoreError::InvalidInput("a user message has no finish reason".into()));
                }
                (MessageRole::Assistant, Some(reason)) if FINISH_REASONS.contains(&reason) => {}
                (MessageRole::Assistant, reason) => {
                    return Err(StoreError::InvalidInput(format!(
                        "an assistant message ends with one of {FINISH_REASONS:?}, not {reason:?}"
                    )));
                }
            }
        }
        let session = self.get(scope, id).await?;
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let title = session
            .title
            .clone()
            .or_else(|| messages.iter().find(|m| m.role == MessageRole::User).and_then(|m| title_from(&m.content)));
        let sql = format!(
            "UPDATE chat_sessions SET updated_at_ms = $3, title = $4 WHERE id = $2 AND {}",
            TenantScope::writable_sql("chat_sessions", 1)
        );
        let updated = sqlx::query(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(id)
            .bind(now)
            .bind(&title)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(StoreError::Forbidden(format!(
                "only the owner, or an owner or admin of its organisation, may continue session `{id}`"
            )));
        }
        let last: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM chat_session_messages WHERE session_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        let mut stored = Vec::with_capacity(messages.len());
        for (offset, message) in messages.into_iter().enumerate() {
            let seq = last + 1 + i64::try_from(offset).unwrap_or(i64::MAX - last - 1);
            sqlx::query(
                "INSERT INTO chat_session_messages (session_id, seq, role, content, finish_reason, error, \
                 prompt_tokens, completion_tokens, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(id)
            .bind(seq)
            .bind(message.role.as_str())
            .bind(&message.content)
            .bind(&message.finish_reason)
            .bind(&message.error)
            .bind(message.prompt_tokens)
            .bind(message.completion_tokens)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|err| {
                StoreError::conflict_on_unique(err, || {
                    format!("session `{id}` was continued elsewhere at the same time; reload it and retry")
                })
            })?;
            stored.push(SessionMessage {
                seq,
                role: message.role,
                content: message.content,
                finish_reason: message.finish_reason,
                error: message.error,
                prompt_tokens: message.prompt_tokens,
                completion_tokens: message.completion_tokens,
                created_at_ms: now,
            });
        }
        tx.commit().await?;
        Ok(stored)
    }

    /// Deletes a session the scope may change, with its messages. Returns the deleted
    /// session.
    pub async fn delete(&self, scope: &TenantScope, id: &str) -> Result<ChatSession> {
        let session = self.get(scope, id).await?;
        let mut tx = self.db.begin_write().await?;
        // The foreign key cascades as well; deleting the messages explicitly keeps the
        // outcome independent of that setting. A refusal below rolls both back.
        let sql =
            format!("DELETE FROM chat_sessions WHERE id = $2 AND {}", TenantScope::writable_sql("chat_sessions", 1));
        sqlx::query("DELETE FROM chat_session_messages WHERE session_id = $1").bind(id).execute(&mut *tx).await?;
        let deleted =
            sqlx::query(trusted_sql(sql)).bind(scope.user_id()).bind(id).execute(&mut *tx).await?.rows_affected();
        if deleted == 0 {
            return Err(StoreError::Forbidden(format!(
                "only the owner, or an owner or admin of its organisation, may delete session `{id}`"
            )));
        }
        tx.commit().await?;
        Ok(session)
    }
}
