//! Delivery of messages to users: email through an SMTP server (lettre, TLS by rustls) and
//! SMS through a provider's webhook. Every message is written to the outbox first
//! (`store::repo::outbox`); delivery then marks it sent, or failed with the reason, so an
//! administrator sees every message that did not reach its recipient. Without a transport
//! for its channel, a message stays in the outbox and is written to the log: never
//! silently skipped.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use maas_store::Db;
use maas_store::repo::outbox::OutboxMessage;

/// How an SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain SMTP, then STARTTLS (required); port 587 usually.
    #[default]
    Starttls,
    /// TLS from the first byte; port 465 usually.
    Tls,
    /// No TLS: only for a relay on the same host or a trusted network.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpOptions {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    /// Empty: no authentication.
    pub username: String,
    pub password: String,
    /// The sender, `maas <noreply@example.com>`.
    pub from: String,
}

/// Where messages go (`[smtp]` and `[sms]` in the config); both absent by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyOptions {
    pub smtp: Option<SmtpOptions>,
    /// An SMS provider's HTTP endpoint: it is sent `{"to": "+86...", "body": "..."}` as a
    /// JSON POST and must answer 2xx. Providers with other APIs sit behind a small adapter.
    pub sms_webhook_url: Option<String>,
}

/// Sends outbox messages through the configured transports.
pub struct Notifier {
    smtp: Option<(AsyncSmtpTransport<Tokio1Executor>, Mailbox)>,
    sms_webhook_url: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("smtp", &self.smtp.is_some())
            .field("sms_webhook_url", &self.sms_webhook_url)
            .finish_non_exhaustive()
    }
}

/// Checks an SMTP sender address (`name <address>` or `address`).
pub fn parse_sender(from: &str) -> Result<Mailbox, String> {
    from.parse::<Mailbox>().map_err(|err| format!("`{from}` is not a sender address: {err}"))
}

impl Notifier {
    /// A notifier for `options`; an SMTP setting that cannot make a transport is logged
    /// and leaves email in the outbox.
    pub fn new(options: &NotifyOptions) -> Self {
        let smtp = options.smtp.as_ref().and_then(|smtp| match build_smtp(smtp) {
            Ok(transport) => Some(transport),
            Err(err) => {
                tracing::error!(error = %err, "email cannot be sent; messages stay in the outbox");
                None
            }
        });
        Notifier {
            smtp,
            sms_webhook_url: options.sms_webhook_url.clone().filter(|url| !url.is_empty()),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default(),
        }
    }

    /// Whether messages on `channel` are delivered (else they wait in the outbox).
    pub fn delivers(&self, channel: &str) -> bool {
        match channel {
            "email" => self.smtp.is_some(),
            "sms" => self.sms_webhook_url.is_some(),
            _ => false,
        }
    }

    /// Delivers `message` and records the outcome in the outbox.
    pub async fn deliver(&self, db: &Db, message: &OutboxMessage) {
        let outcome = match message.channel.as_str() {
            "email" => self.send_email(message).await,
            "sms" => self.send_sms(message).await,
            other => Err(format!("no transport for channel {other}")),
        };
        match &outcome {
            Ok(()) => tracing::info!(message_id = %message.id, channel = %message.channel, "message delivered"),
            Err(reason) => {
                tracing::warn!(message_id = %message.id, channel = %message.channel, %reason, "message not delivered; it stays in the outbox");
            }
        }
        if let Err(err) = db.outbox().mark(&message.id, outcome.err().as_deref()).await {
            tracing::error!(error = %err, "recording a message's delivery failed");
        }
    }

    async fn send_email(&self, message: &OutboxMessage) -> Result<(), String> {
        let Some((transport, from)) = &self.smtp else { return Err("no smtp server is configured".into()) };
        let to: Mailbox =
            message.recipient.parse().map_err(|err| format!("bad recipient {}: {err}", message.recipient))?;
        let email = Message::builder()
            .from(from.clone())
            .to(to)
            .subject(&message.subject)
            .body(message.body.clone())
            .map_err(|err| format!("the message cannot be built: {err}"))?;
        transport.send(email).await.map(|_| ()).map_err(|err| format!("smtp: {err}"))
    }

    async fn send_sms(&self, message: &OutboxMessage) -> Result<(), String> {
        let Some(url) = &self.sms_webhook_url else { return Err("no sms provider is configured".into()) };
        let response = self
            .http
            .post(url)
            .json(&serde_json::json!({"to": message.recipient, "body": message.body}))
            .send()
            .await
            .map_err(|err| format!("sms provider at {url}: {err}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("sms provider at {url} answered {}", response.status()))
        }
    }
}

fn build_smtp(options: &SmtpOptions) -> Result<(AsyncSmtpTransport<Tokio1Executor>, Mailbox), String> {
    let from = parse_sender(&options.from)?;
    let builder = match options.security {
        SmtpSecurity::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&options.host),
        SmtpSecurity::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&options.host)
            .map_err(|err| format!("smtp {}: {err}", options.host))?,
        SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&options.host)
            .map_err(|err| format!("smtp {}: {err}", options.host))?,
    };
    let mut builder = builder.port(options.port).timeout(Some(Duration::from_secs(10)));
    if !options.username.is_empty() {
        builder = builder.credentials(Credentials::new(options.username.clone(), options.password.clone()));
    }
    Ok((builder.build(), from))
}
