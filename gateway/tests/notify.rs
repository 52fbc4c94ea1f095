//! Verification codes reach users through a real SMTP server (aiosmtpd from PyPI, writing a
//! maildir) and an SMS provider's webhook (a local HTTP endpoint that records what it is
//! sent); a mail server that is down leaves the message in the outbox with the reason.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use maas_gateway::notify::{NotifyOptions, SmtpOptions, SmtpSecurity};
use maas_gateway::{AppState, GatewayOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const PASSWORD: &str = "plum-Harbour-sings-92-quietly";

/// A real SMTP server (`python3 -m aiosmtpd`) delivering into a maildir; killed on drop.
struct SmtpServer {
    child: Child,
    port: u16,
    maildir: std::path::PathBuf,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn smtp_server(dir: &std::path::Path) -> SmtpServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let maildir = dir.join("maildir");
    let child = Command::new("python3")
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
        .arg(&maildir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with aiosmtpd (scripts/test installs it)");
    let server = SmtpServer { child, port, maildir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "aiosmtpd did not start on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

/// An SMS provider's webhook: answers 200 and hands each JSON body to the test.
async fn sms_webhook() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/send", listener.local_addr().unwrap());
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            let body = loop {
                let read = stream.read(&mut buffer).await.unwrap_or(0);
                if read == 0 {
                    break None;
                }
                request.extend_from_slice(&buffer[..read]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break Some(body[..length].to_owned());
                    }
                }
            };
            if let Some(body) = body {
                let _ = sender.send(serde_json::from_str(&body).unwrap_or(Value::Null));
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        }
    });
    (url, receiver)
}

async fn gateway(
    dir: &std::path::Path,
    notify: NotifyOptions,
) -> (String, Arc<AppState>, maas_gateway::ShutdownTrigger) {
    let state = Arc::new(AppState::new("notify-node", GatewayOptions { notify, ..GatewayOptions::default() }));
    common::open_stores(&state, maas_store::db::sqlite_url_in(dir), dir).await;
    let (base, trigger) = common::serve(&state).await;
    (base, state, trigger)
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new().post(format!("{base}{path}")).json(body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn six_digits(text: &str) -> Option<String> {
    text.split(|c: char| !c.is_ascii_digit()).find(|word| word.len() == 6).map(str::to_owned)
}

/// Waits (bounded) for a mail in the maildir; its text.
async fn next_mail(maildir: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(entries) = std::fs::read_dir(maildir.join("new"))
            && let Some(entry) = entries.flatten().next()
        {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            std::fs::remove_file(entry.path()).unwrap();
            return text;
        }
        assert!(Instant::now() < deadline, "no mail arrived in {}", maildir.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_reach_users_by_mail_and_sms_and_failures_stay_in_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = smtp_server(dir.path()).await;
    let (webhook, mut texts) = sms_webhook().await;
    let notify = NotifyOptions {
        smtp: Some(SmtpOptions {
            host: "127.0.0.1".into(),
            port: smtp.port,
            security: SmtpSecurity::None,
            username: String::new(),
            password: String::new(),
            from: "maas <noreply@maas.test>".into(),
        }),
        sms_webhook_url: Some(webhook),
    };
    let (base, state, _serving) = gateway(dir.path(), notify).await;
    let (status, _) = post(&base, "/v1/auth/signup", &json!({"email": "root@example.com", "password": PASSWORD})).await;
    assert_eq!(status, 201, "the first account is the administrator");

    // Email: the code arrives through the SMTP server and activates the account.
    let (status, _) = post(&base, "/v1/auth/signup", &json!({"email": "erin@example.com", "password": PASSWORD})).await;
    assert_eq!(status, 201);
    let mail = next_mail(&smtp.maildir).await;
    assert!(mail.contains("To: erin@example.com") && mail.contains("noreply@maas.test"), "{mail}");
    let code = six_digits(&mail).expect("the mail holds a code");
    let (status, body) = post(&base, "/v1/auth/verify", &json!({"login": "erin@example.com", "code": code})).await;
    assert_eq!(status, 200, "{body}");

    // SMS: the provider's webhook is sent the number and the code.
    let (status, _) = post(&base, "/v1/auth/signup", &json!({"phone": "+8613800000001", "password": PASSWORD})).await;
    assert_eq!(status, 201);
    let text = tokio::time::timeout(Duration::from_secs(10), texts.recv()).await.unwrap().unwrap();
    assert_eq!(text["to"], "+8613800000001", "{text}");
    let code = six_digits(text["body"].as_str().unwrap()).unwrap();
    let (status, body) = post(&base, "/v1/auth/verify", &json!({"login": "+8613800000001", "code": code})).await;
    assert_eq!(status, 200, "{body}");

    // The mail server goes away: the message stays in the outbox with the reason.
    drop(smtp);
    let (status, _) =
        post(&base, "/v1/auth/signup", &json!({"email": "frank@example.com", "password": PASSWORD})).await;
    assert_eq!(status, 201);
    let db = &state.stores.get().unwrap().db;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let messages = db.outbox().list(Some("frank@example.com"), 10).await.unwrap();
        if let Some(message) = messages.first()
            && let Some(error) = &message.error
        {
            assert!(message.sent_at_ms.is_none());
            assert!(error.contains("smtp"), "{error}");
            break;
        }
        assert!(Instant::now() < deadline, "the failed delivery is recorded: {messages:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = db.outbox().list(Some("erin@example.com"), 10).await.unwrap();
    assert!(delivered[0].sent_at_ms.is_some() && delivered[0].error.is_none(), "{delivered:?}");
}
