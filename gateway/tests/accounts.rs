//! Accounts, keys and tenancy through the HTTP API, on SQLite and on PostgreSQL:
//!
//! - TEN-1, table-driven over the router's own list of routes (the OpenAPI document): a
//!   request without credentials is refused on every route that is not public, and a
//!   second tenant reaches none of the first tenant's data on any route. A new route is in
//!   the walk without anyone adding it; one whose path the table cannot fill fails the test
//!   until it is given ids.
//! - Sign-up, password rules, verification through the outbox, sign-in and its
//!   throttling, cookies, sign-out, password reset, expired, forged and revoked tokens and
//!   keys, key scopes, and the append-only audit log.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use maas_gateway::state::AuthOptions;
use maas_gateway::{AppState, GatewayOptions};
use serde_json::{Value, json};

const POSTGRES_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const STRONG: &str = "plum-Harbour-sings-92-quietly";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Setup {
    base: String,
    state: Arc<AppState>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    _serving: maas_gateway::ShutdownTrigger,
}

async fn database_url(backend: Backend, dir: &std::path::Path) -> String {
    match backend {
        Backend::Sqlite => maas_store::db::sqlite_url_in(dir),
        Backend::Postgres => {
            use sqlx::Connection as _;
            let admin = std::env::var("MAAS_TEST_POSTGRES_URL").unwrap_or_else(|_| POSTGRES_ADMIN.to_owned());
            let name = format!("maas_test_{}", uuid::Uuid::new_v4().simple());
            let mut connection = sqlx::PgConnection::connect(&admin).await.expect("postgres is needed by these tests");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut connection).await.unwrap();
            format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
        }
    }
}

async fn setup(backend: Backend) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let options = GatewayOptions {
        auth: AuthOptions { max_sign_in_failures: 3, ..AuthOptions::default() },
        ..GatewayOptions::default()
    };
    let state = Arc::new(AppState::new("accounts-node", options));
    common::open_stores(&state, database_url(backend, dir.path()).await, dir.path()).await;
    let _ = state.cluster_cookie.set("accounts-test-cookie".to_owned());
    let (base, trigger) = common::serve(&state).await;
    Setup { base, state, http: reqwest::Client::new(), _dir: dir, _serving: trigger }
}

/// Who a request is sent as.
#[derive(Clone, Debug)]
enum As {
    Nobody,
    Bearer(String),
    Cookie(String),
}

impl Setup {
    async fn send(
        &self,
        who: &As,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        match who {
            As::Nobody => {}
            As::Bearer(token) => request = request.bearer_auth(token),
            As::Cookie(token) => request = request.header("cookie", format!("theme=dark; maas_session={token}")),
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.unwrap())
    }

    async fn json(&self, who: &As, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, text) = self.send(who, method, path, body).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn sign_up(&self, email: &str) -> Value {
        let (status, body) = self
            .json(
                &As::Nobody,
                reqwest::Method::POST,
                "/v1/auth/signup",
                Some(json!({"email": email, "password": STRONG})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    async fn sign_in(&self, email: &str, password: &str) -> (u16, Value) {
        self.json(
            &As::Nobody,
            reqwest::Method::POST,
            "/v1/auth/login",
            Some(json!({"login": email, "password": password})),
        )
        .await
    }

    /// Signs up and in (verifying through the outbox when needed); the session token.
    async fn account(&self, admin: &As, email: &str) -> String {
        let created = self.sign_up(email).await;
        if created["verification_required"] == true {
            let code = self.code_for(admin, email).await;
            let (status, body) = self
                .json(
                    &As::Nobody,
                    reqwest::Method::POST,
                    "/v1/auth/verify",
                    Some(json!({"login": email, "code": code})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        let (status, body) = self.sign_in(email, STRONG).await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// The newest code sent to `recipient`, read from the outbox as an administrator.
    async fn code_for(&self, admin: &As, recipient: &str) -> String {
        let (status, outbox) =
            self.json(admin, reqwest::Method::GET, &format!("/v1/admin/outbox?recipient={recipient}"), None).await;
        assert_eq!(status, 200, "{outbox}");
        let body = outbox["data"][0]["body"].as_str().expect("a message to the recipient").to_owned();
        body.split_whitespace().find(|w| w.len() == 7 && w[..6].bytes().all(|b| b.is_ascii_digit())).expect("a code")
            [..6]
            .to_owned()
    }
}

/// A multipart upload of a batch file, as the OpenAI SDK sends it.
async fn upload(setup: &Setup, who: &As) -> Value {
    let line = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}});
    let boundary = "ten1-boundary";
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\ncontent-type: application/jsonl\r\n\r\n{line}\n\r\n--{boundary}--\r\n"
    );
    let mut request = setup
        .http
        .post(format!("{}/v1/files", setup.base))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body);
    if let As::Bearer(token) = who {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Routes anyone may call.
const PUBLIC: &[&str] = &[
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/v1/auth/signup",
    "/v1/auth/verify",
    "/v1/auth/codes",
    "/v1/auth/login",
    "/v1/auth/password/reset",
    "/v1/auth/oauth",
    "/v1/auth/oauth/{name}/start",
    "/v1/auth/oauth/{name}/callback",
];

/// Fills a route template with the first tenant's ids, so the second tenant aims at them.
fn fill(template: &str, ids: &BTreeMap<&str, String>) -> Option<String> {
    let resource = |prefix: &str| -> Option<&str> {
        [
            ("/v1/files/", "file"),
            ("/v1/batches/", "batch"),
            ("/v1/fine_tuning/jobs/", "ftjob"),
            ("/v1/sessions/", "session"),
            ("/v1/safety/rules/", "rule"),
            ("/v1/keys/", "key"),
            ("/v1/orgs/", "org"),
            ("/v1/auth/sessions/", "sign_in"),
            ("/v1/admin/users/", "user"),
            ("/v1/admin/quotas/", "user"),
            ("/v1/deployments/", "deployment"),
            ("/v1/nodes/", "node"),
            ("/v1/cluster/members/", "node"),
            ("/v1/blobs/", "sha256"),
            ("/v1/admin/prices/", "price"),
            ("/v1/knowledge_bases/kb-", "document"),
            ("/v1/knowledge_bases/", "kb"),
        ]
        .iter()
        .find(|(p, _)| prefix.starts_with(p))
        .map(|(_, kind)| *kind)
    };
    let mut out = String::new();
    for segment in template.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        match segment {
            "{kind}" => out.push_str("user"),
            // Sign-in providers are the platform's, not a tenant's.
            "{name}" if out == "/v1/auth/oauth/" => out.push_str("corp"),
            "{user_id}" => out.push_str(&ids["user"]),
            s if s.starts_with('{') => out.push_str(&ids[resource(&out)?]),
            s => out.push_str(s),
        }
    }
    Some(if out.is_empty() { "/".to_owned() } else { out })
}

/// Bodies that would succeed for the resource's owner, so a refusal is about tenancy, not
/// validation.
fn body_for(
    method: &reqwest::Method,
    template: &str,
    ids: &BTreeMap<&str, String>,
    intruder_email: &str,
) -> Option<Value> {
    if *method == reqwest::Method::GET || *method == reqwest::Method::DELETE {
        return None;
    }
    Some(match template {
        "/v1/batches" => {
            json!({"input_file_id": ids["file"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        }
        "/v1/fine_tuning/jobs" => json!({"model": "m", "training_file": ids["file"]}),
        "/v1/orgs/{id}/members" => json!({"login": intruder_email, "role": "owner"}),
        "/v1/knowledge_bases" => json!({"name": "bobs", "embedding_model": "embed"}),
        "/v1/knowledge_bases/{id}" => json!({"description": "taken over"}),
        "/v1/knowledge_bases/{id}/retrieve" => json!({"query": "alice-secret-word", "mode": "fulltext"}),
        "/v1/admin/users/{id}" => json!({"role": "user", "status": "disabled"}),
        "/v1/admin/quotas/{kind}/{id}" => json!({"requests_per_minute": 1}),
        "/v1/admin/prices/{model}" => {
            json!({"input_per_1k_micros": 1, "output_per_1k_micros": 1, "gpu_hour_micros": 1})
        }
        "/v1/auth/password" => {
            json!({"current_password": "not-the-password", "new_password": "another-Strong-pass-77"})
        }
        _ => json!({}),
    })
}

async fn tenants_reach_nothing_of_each_other_on_any_route(backend: Backend) {
    let setup = setup(backend).await;
    let operator = As::Bearer(setup.account(&As::Nobody, "operator@example.com").await);
    let alice = As::Bearer(setup.account(&operator, "alice@example.com").await);
    let bob = As::Bearer(setup.account(&operator, "bob@example.com").await);

    // Alice's things: a file, a batch, a chat session, a safety rule, a key, an org.
    let mut ids: BTreeMap<&str, String> = BTreeMap::new();
    let file = upload(&setup, &alice).await;
    ids.insert("file", file["id"].as_str().unwrap().to_owned());
    let post = reqwest::Method::POST;
    let (status, batch) =
        setup.json(&alice, post.clone(), "/v1/batches", body_for(&post, "/v1/batches", &ids, "")).await;
    assert_eq!(status, 200, "{batch}");
    ids.insert("batch", batch["id"].as_str().unwrap().to_owned());
    let (status, rule) = setup
        .json(
            &alice,
            post.clone(),
            "/v1/safety/rules",
            Some(json!({"direction": "input", "kind": "keyword", "pattern": "alice-secret-word"})),
        )
        .await;
    assert_eq!(status, 201, "{rule}");
    ids.insert("rule", rule["id"].as_str().unwrap().to_owned());
    let (status, key) = setup.json(&alice, post.clone(), "/v1/keys", Some(json!({"name": "alice key"}))).await;
    assert_eq!(status, 201, "{key}");
    ids.insert("key", key["id"].as_str().unwrap().to_owned());
    let (status, org) = setup.json(&alice, post.clone(), "/v1/orgs", Some(json!({"name": "alice-org"}))).await;
    assert_eq!(status, 201, "{org}");
    ids.insert("org", org["id"].as_str().unwrap().to_owned());
    let (_, me) = setup.json(&alice, reqwest::Method::GET, "/v1/auth/me", None).await;
    ids.insert("user", me["user"]["id"].as_str().unwrap().to_owned());
    let db = &setup.state.stores.get().unwrap().db;
    let alice_scope = maas_store::TenantScope::resolve(db, &ids["user"], None).await.unwrap();
    alice_rows(db, &alice_scope, &mut ids).await;
    ids.insert("sign_in", me["credential"]["session_id"].as_str().unwrap().to_owned());
    alice_knowledge_base(&setup, &alice, &alice_scope, &mut ids).await;
    ids.insert("deployment", "ghost".into());
    ids.insert("node", "1".into());
    ids.insert("price", "*".into());
    ids.insert("sha256", file_sha256(&setup, &ids["file"]).await);
    let secrets: Vec<String> =
        ids.iter().filter(|(k, _)| !matches!(**k, "deployment" | "node" | "price")).map(|(_, v)| v.clone()).collect();

    let mut walked = 0;
    for (method, template) in maas_gateway::routes::openapi::documented_routes() {
        if template.starts_with("/debug/") || template.starts_with("/internal/") {
            continue;
        }
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
        let path = fill(&template, &ids).unwrap_or_else(|| panic!("TEN-1: give {template} its ids in fill()"));
        let body = body_for(&method, &template, &ids, "bob@example.com");
        let (status, _, text) = setup.send(&As::Nobody, method.clone(), &path, body.clone()).await;
        if PUBLIC.contains(&template.as_str()) {
            assert_ne!(status, 500, "{method} {path} without credentials: {text}");
        } else {
            // 401, or 403 where only the cluster cookie is accepted (node-to-node routes).
            assert!(matches!(status, 401 | 403), "{method} {path} answered {status} without credentials: {text}");
        }
        if template == "/v1/auth/logout" {
            // Bob signing himself out is his own business, and would end the walk.
            continue;
        }
        let (status, _, text) = setup.send(&bob, method.clone(), &path, body).await;
        assert!(status < 500 || status == 503, "{method} {path} as bob: {status} {text}");
        if (200..300).contains(&status) {
            for secret in &secrets {
                assert!(!text.contains(secret.as_str()), "TEN-1: {method} {path} showed bob alice's {secret}: {text}");
            }
        }
        walked += 1;
    }
    assert!(walked > 40, "only {walked} routes walked");

    // Nothing of alice's changed: her session works, her file, rule, key and org are hers.
    let (status, files) = setup.json(&alice, reqwest::Method::GET, "/v1/files", None).await;
    assert_eq!(status, 200, "{files}");
    assert_eq!(files["data"][0]["id"], ids["file"].as_str());
    let (_, rules) = setup.json(&alice, reqwest::Method::GET, "/v1/safety/rules", None).await;
    assert!(rules.to_string().contains(&ids["rule"]), "{rules}");
    let (_, keys) = setup.json(&alice, reqwest::Method::GET, "/v1/keys", None).await;
    assert_eq!(keys["data"][0]["status"], "active", "{keys}");
    let (_, members) =
        setup.json(&alice, reqwest::Method::GET, &format!("/v1/orgs/{}/members", ids["org"]), None).await;
    assert_eq!(members["data"].as_array().unwrap().len(), 1, "bob did not join alice's org: {members}");
    let (_, job) =
        setup.json(&alice, reqwest::Method::GET, &format!("/v1/fine_tuning/jobs/{}", ids["ftjob"]), None).await;
    assert_eq!(job["status"], "queued", "bob did not cancel alice's job: {job}");
    let (_, me) = setup.json(&alice, reqwest::Method::GET, "/v1/auth/me", None).await;
    assert_eq!(me["user"]["status"], "active", "{me}");
    assert_eq!(me["user"]["role"], "user", "{me}");
}

/// Alice's chat session (its route needs the control plane, which this test does not run)
/// and fine-tuning job (training needs a model): the rows are enough for the walk.
async fn alice_rows(
    db: &maas_store::Db,
    alice_scope: &maas_store::TenantScope,
    ids: &mut BTreeMap<&'static str, String>,
) {
    let session = db
        .sessions()
        .create(
            alice_scope,
            maas_store::repo::sessions::NewChatSession {
                model: "m".into(),
                system_prompt: None,
                sampling: json!({}),
                title: None,
            },
        )
        .await
        .unwrap();
    ids.insert("session", session.id);
    let job = maas_store::repo::fine_tuning::NewJob {
        model: "m:v1".into(),
        training_file: ids["file"].clone(),
        validation_file: None,
        settings: json!({}),
        suffix: None,
        total_steps: 1,
    };
    ids.insert("ftjob", db.fine_tuning_jobs().create(alice_scope, job).await.unwrap().id);
}

/// Alice's knowledge base with a document in it (ingestion needs a model; the rows are
/// enough for the walk).
async fn alice_knowledge_base(
    setup: &Setup,
    alice: &As,
    alice_scope: &maas_store::TenantScope,
    ids: &mut BTreeMap<&'static str, String>,
) {
    let db = &setup.state.stores.get().unwrap().db;
    let (status, kb) = setup
        .json(
            alice,
            reqwest::Method::POST,
            "/v1/knowledge_bases",
            Some(json!({"name": "alice-kb", "embedding_model": "embed"})),
        )
        .await;
    assert_eq!(status, 200, "{kb}");
    ids.insert("kb", kb["id"].as_str().unwrap().to_owned());
    let document = db
        .knowledge_bases()
        .add_document(
            alice_scope,
            &ids["kb"],
            maas_store::repo::knowledge::NewDocument {
                filename: "alice.txt".into(),
                kind: "text".into(),
                sha256: file_sha256(setup, &ids["file"]).await,
                size_bytes: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    ids.insert("document", document.id);
}

async fn file_sha256(setup: &Setup, file_id: &str) -> String {
    let db = &setup.state.stores.get().unwrap().db;
    let sha: String =
        sqlx::query_scalar("SELECT sha256 FROM files WHERE id = $1").bind(file_id).fetch_one(db.pool()).await.unwrap();
    sha
}

async fn accounts_sign_in_and_keys_behave(backend: Backend) {
    let setup = setup(backend).await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // The first account is the administrator, active at once.
    let first = setup.sign_up("Admin@Example.com").await;
    assert_eq!(first["user"]["role"], "admin", "{first}");
    assert_eq!(first["verification_required"], false);
    let (status, signed_in) = setup.sign_in("admin@example.com", STRONG).await;
    assert_eq!(status, 200, "{signed_in}");
    let admin = As::Bearer(signed_in["token"].as_str().unwrap().to_owned());

    // Password rules, with the estimator's reason.
    for (password, reason) in
        [("short", "at least 8"), ("password1", "too easy to guess"), ("carol@example.com", "too easy")]
    {
        let (status, body) = setup
            .json(
                &As::Nobody,
                post.clone(),
                "/v1/auth/signup",
                Some(json!({"email": "carol@example.com", "password": password})),
            )
            .await;
        assert_eq!(status, 400, "{password}: {body}");
        assert_eq!(body["error"]["code"], "weak_password");
        assert!(body["error"]["message"].as_str().unwrap().contains(reason), "{body}");
    }
    let (status, body) = setup
        .json(&As::Nobody, post.clone(), "/v1/auth/signup", Some(json!({"email": "not-an-email", "password": STRONG})))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_email")), "{body}");
    let (status, body) = setup
        .json(
            &As::Nobody,
            post.clone(),
            "/v1/auth/signup",
            Some(json!({"email": "x@example.com", "password": STRONG, "admin": true})),
        )
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");

    // Later accounts wait for their code, which the outbox holds.
    let carol = setup.sign_up("carol@example.com").await;
    assert_eq!(carol["verification_required"], true);
    let (status, body) = setup.sign_in("carol@example.com", STRONG).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("account_not_verified")), "{body}");
    let (status, body) = setup
        .json(
            &As::Nobody,
            post.clone(),
            "/v1/auth/verify",
            Some(json!({"login": "carol@example.com", "code": "000000"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let code = setup.code_for(&admin, "carol@example.com").await;
    let (status, body) = setup
        .json(&As::Nobody, post.clone(), "/v1/auth/verify", Some(json!({"login": "carol@example.com", "code": code})))
        .await;
    assert_eq!(status, 200, "{body}");

    // Sign-in sets an HTTP-only, SameSite cookie that authenticates like the token.
    let response = setup
        .http
        .post(format!("{}/v1/auth/login", setup.base))
        .json(&json!({"login": "carol@example.com", "password": STRONG}))
        .send()
        .await
        .unwrap();
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.starts_with("maas_session="),
        "{cookie}"
    );
    let token = response.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let (status, me) = setup.json(&As::Cookie(token.clone()), get.clone(), "/v1/auth/me", None).await;
    assert_eq!((status, me["user"]["email"].as_str()), (200, Some("carol@example.com")), "{me}");
    let carol_session = As::Bearer(token.clone());

    let carol = throttling_and_password_reset(&setup, &admin, &carol_session).await;
    let carol_id = keys_are_shown_once_scoped_and_revocable(&setup, &carol).await;
    let first_id = first["user"]["id"].as_str().unwrap().to_owned();
    sign_out_roles_and_the_audit_log(&setup, &admin, &carol, &carol_id, &first_id).await;
}

/// Repeated failures throttle the account, even with the right password then; a reset by
/// code signs every session out and lifts the throttle. Carol's new session.
async fn throttling_and_password_reset(setup: &Setup, admin: &As, carol_session: &As) -> As {
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    for _ in 0..3 {
        let (status, _) = setup.sign_in("carol@example.com", "wrong-password-123").await;
        assert_eq!(status, 401);
    }
    let (status, headers, text) = setup
        .send(
            &As::Nobody,
            post.clone(),
            "/v1/auth/login",
            Some(json!({"login": "carol@example.com", "password": STRONG})),
        )
        .await;
    assert_eq!(status, 429, "{text}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=900).contains(&retry), "{retry}");

    // A password reset by code signs every session out and lifts the throttle.
    let (status, _) = setup
        .json(
            &As::Nobody,
            post.clone(),
            "/v1/auth/codes",
            Some(json!({"login": "carol@example.com", "purpose": "reset"})),
        )
        .await;
    assert_eq!(status, 202);
    let (status, _) = setup
        .json(
            &As::Nobody,
            post.clone(),
            "/v1/auth/codes",
            Some(json!({"login": "nobody@example.com", "purpose": "reset"})),
        )
        .await;
    assert_eq!(status, 202, "unknown accounts are not revealed");
    let code = setup.code_for(admin, "carol@example.com").await;
    let new_password = "Another-strong-pass-51";
    let (status, body) = setup
        .json(
            &As::Nobody,
            post.clone(),
            "/v1/auth/password/reset",
            Some(json!({"login": "carol@example.com", "code": code, "new_password": new_password})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = setup.json(carol_session, get.clone(), "/v1/auth/me", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_session")), "{body}");
    let (status, signed_in) = setup.sign_in("carol@example.com", new_password).await;
    assert_eq!(status, 200, "{signed_in}");
    As::Bearer(signed_in["token"].as_str().unwrap().to_owned())
}

/// Keys: shown once, hashed, scoped; revoked and expired keys stop working. Returns the
/// key owner's id.
async fn keys_are_shown_once_scoped_and_revocable(setup: &Setup, carol: &As) -> String {
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let (status, key) =
        setup.json(carol, post.clone(), "/v1/keys", Some(json!({"name": "reader", "scopes": ["read_only"]}))).await;
    assert_eq!(status, 201, "{key}");
    let secret = key["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk-maas-") && secret.starts_with(key["prefix"].as_str().unwrap()), "{key}");
    let (_, listed) = setup.json(carol, get.clone(), "/v1/keys", None).await;
    assert!(!listed.to_string().contains(&secret), "a key is shown once: {listed}");
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE secret_sha256 = $1 OR prefix = $1")
        .bind(&secret)
        .fetch_one(setup.state.stores.get().unwrap().db.pool())
        .await
        .unwrap();
    assert_eq!(stored, 0, "the secret itself is not stored");
    let reader = As::Bearer(secret.clone());
    let (status, me) = setup.json(&reader, get.clone(), "/v1/auth/me", None).await;
    assert_eq!((status, me["credential"]["kind"].as_str()), (200, Some("api_key")), "{me}");
    let (status, body) =
        setup.json(&reader, post.clone(), "/v1/keys", Some(json!({"name": "escalate", "scopes": ["admin"]}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("insufficient_scope")), "{body}");
    let (status, _) = setup.json(&reader, get.clone(), "/v1/keys", None).await;
    assert_eq!(status, 200, "a read-only key reads");
    let (status, body) = setup.json(&reader, get.clone(), "/v1/admin/users", None).await;
    assert_eq!(status, 403, "a user's key is no administrator: {body}");
    let (status, _) =
        setup.json(carol, reqwest::Method::DELETE, &format!("/v1/keys/{}", key["id"].as_str().unwrap()), None).await;
    assert_eq!(status, 200);
    let (status, body) = setup.json(&reader, get.clone(), "/v1/auth/me", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("api_key_revoked")), "{body}");

    let db = &setup.state.stores.get().unwrap().db;
    let carol_id = me["user"]["id"].as_str().unwrap().to_owned();
    let scope = maas_store::TenantScope::resolve(db, &carol_id, None).await.unwrap();
    db.api_keys()
        .create(
            &scope,
            maas_store::repo::keys::NewKey {
                name: "old".into(),
                prefix: "sk-maas-expired0".into(),
                secret_sha256: maas_gateway::auth::secrets::sha256_hex(
                    "sk-maas-expired000000000000000000000000000000000",
                ),
                scopes: vec![maas_store::repo::keys::KeyScope::Inference],
                expires_at_ms: Some(maas_store::ids::now_ms() - 1000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for (token, code) in [
        ("sk-maas-expired000000000000000000000000000000000", "api_key_expired"),
        ("sk-maas-forged0000000000000000000000000000000000", "invalid_api_key"),
        ("maas_st_forged00000000000000000000000000000000", "invalid_session"),
        ("eyJhbGciOiJIUzI1NiJ9.e30.forged", "invalid_api_key"),
    ] {
        let (status, body) = setup.json(&As::Bearer(token.into()), get.clone(), "/v1/files", None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some(code)), "{token}: {body}");
    }

    carol_id
}

/// Sign-out ends the session; administrators change roles; all of it is audited.
async fn sign_out_roles_and_the_audit_log(setup: &Setup, admin: &As, carol: &As, carol_id: &str, first_id: &str) {
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let db = &setup.state.stores.get().unwrap().db;
    let (status, _) = setup.json(carol, post.clone(), "/v1/auth/logout", None).await;
    assert_eq!(status, 200);
    let (status, _) = setup.json(carol, get.clone(), "/v1/auth/me", None).await;
    assert_eq!(status, 401);
    let (status, body) = setup
        .json(
            admin,
            reqwest::Method::PATCH,
            &format!("/v1/admin/users/{carol_id}"),
            Some(json!({"role": "enterprise"})),
        )
        .await;
    assert_eq!((status, body["role"].as_str()), (200, Some("enterprise")), "{body}");
    let (status, body) = setup
        .json(admin, reqwest::Method::PATCH, &format!("/v1/admin/users/{first_id}"), Some(json!({"role": "user"})))
        .await;
    assert_eq!(status, 409, "the last administrator stays: {body}");
    let (status, audit) = setup.json(admin, get.clone(), "/v1/admin/audit?limit=200", None).await;
    assert_eq!(status, 200, "{audit}");
    let actions: Vec<&str> = audit["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for action in [
        "auth.sign_up",
        "auth.sign_in",
        "auth.sign_in_failed",
        "auth.password_reset",
        "key.create",
        "key.revoke",
        "auth.sign_out",
        "user.role",
    ] {
        assert!(actions.contains(&action), "{action} is audited: {actions:?}");
    }
    assert!(audit["data"].as_array().unwrap().iter().all(|e| e["address"] == "127.0.0.1"), "{audit}");
    for statement in ["UPDATE audit_log SET action = 'nothing'", "DELETE FROM audit_log"] {
        let result = sqlx::query(statement).execute(db.pool()).await;
        assert!(result.is_err(), "the audit log is append-only: {statement} succeeded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten1_on_every_route_with_sqlite() {
    tenants_reach_nothing_of_each_other_on_any_route(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten1_on_every_route_with_postgres() {
    tenants_reach_nothing_of_each_other_on_any_route(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_keys_with_sqlite() {
    accounts_sign_in_and_keys_behave(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_keys_with_postgres() {
    accounts_sign_in_and_keys_behave(Backend::Postgres).await;
}

/// Several sign-ups racing to be the first account make exactly one administrator.
async fn racing_first_sign_ups_make_one_administrator(backend: Backend) {
    let setup = setup(backend).await;
    let sign_ups = (0..6).map(|i| {
        let setup = &setup;
        async move {
            let body = json!({"email": format!("racer{i}@example.com"), "password": STRONG});
            setup.json(&As::Nobody, reqwest::Method::POST, "/v1/auth/signup", Some(body)).await
        }
    });
    let answers = futures_util::future::join_all(sign_ups).await;
    assert!(answers.iter().all(|(status, _)| *status == 201), "{answers:?}");
    let admins = answers.iter().filter(|(_, body)| body["user"]["role"] == "admin").count();
    assert_eq!(admins, 1, "{answers:?}");
    let db = &setup.state.stores.get().unwrap().db;
    assert_eq!(db.users().count_admins().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_first_administrator_with_sqlite() {
    racing_first_sign_ups_make_one_administrator(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_first_administrator_with_postgres() {
    racing_first_sign_ups_make_one_administrator(Backend::Postgres).await;
}
