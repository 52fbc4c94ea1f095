//! The outbox: every message to a user (a verification code, a password reset) is written
//! here first. A configured SMTP server or SMS provider sends it and marks it sent (or
//! failed, with the reason); without one, administrators read it in the console and CLI.

use serde::Serialize;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};

/// A message to a user (a verification or reset code), sent or waiting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct OutboxMessage {
    pub id: String,
    /// `email` or `sms`.
    pub channel: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub created_at_ms: i64,
    pub sent_at_ms: Option<i64>,
    pub error: Option<String>,
}

pub struct Outbox<'a> {
    pub(crate) db: &'a Db,
}

type MessageRow = (String, String, String, String, String, i64, Option<i64>, Option<String>);

impl Outbox<'_> {
    pub async fn push(&self, channel: &str, recipient: &str, subject: &str, body: &str) -> Result<OutboxMessage> {
        if !matches!(channel, "email" | "sms") {
            return Err(StoreError::InvalidInput(format!("unknown channel `{channel}`: use email or sms")));
        }
        let message = OutboxMessage {
            id: new_id("msg"),
            channel: channel.to_owned(),
            recipient: recipient.to_owned(),
            subject: subject.to_owned(),
            body: body.to_owned(),
            created_at_ms: now_ms(),
            sent_at_ms: None,
            error: None,
        };
        sqlx::query(
            "INSERT INTO outbox (id, channel, recipient, subject, body, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&message.id)
        .bind(&message.channel)
        .bind(&message.recipient)
        .bind(&message.subject)
        .bind(&message.body)
        .bind(message.created_at_ms)
        .execute(self.db.pool())
        .await?;
        Ok(message)
    }

    /// Marks a message sent (`error` None) or failed to send (with the reason).
    pub async fn mark(&self, id: &str, error: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE outbox SET sent_at_ms = $1, error = $2 WHERE id = $3")
            .bind(error.is_none().then(now_ms))
            .bind(error)
            .bind(id)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// The newest messages, optionally only those to `recipient`.
    pub async fn list(&self, recipient: Option<&str>, limit: u32) -> Result<Vec<OutboxMessage>> {
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT id, channel, recipient, subject, body, created_at_ms, sent_at_ms, error FROM outbox \
             WHERE ($1 IS NULL OR recipient = $1) ORDER BY created_at_ms DESC, id DESC LIMIT $2",
        )
        .bind(recipient)
        .bind(i64::from(limit.clamp(1, 1000)))
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, channel, recipient, subject, body, created_at_ms, sent_at_ms, error)| OutboxMessage {
                id,
                channel,
                recipient,
                subject,
                body,
                created_at_ms,
                sent_at_ms,
                error,
            })
            .collect())
    }
}
