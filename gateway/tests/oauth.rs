//! Sign-in through OAuth 2.0 / OpenID Connect, end to end through a browser's steps:
//! against a real OpenID Connect provider (panva's certified `oidc-provider` from npm, in
//! `tests/oidc/`, started by the test with node) and a local stand-in for GitHub's OAuth
//! app endpoints and user API (GitHub itself is on the internet).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use maas_gateway::auth::oauth::{OAuthProvider, ProviderKind};
use maas_gateway::state::AuthOptions;
use maas_gateway::{AppState, GatewayOptions};
use serde_json::{Value, json};
use warp::Filter as _;

const CLIENT_ID: &str = "maas-test";
const CLIENT_SECRET: &str = "a-long-client-secret-for-the-tests";

/// The OpenID Connect provider (`node tests/oidc/provider.mjs`); killed on drop.
struct OidcProvider {
    child: Child,
    issuer: String,
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_oidc_provider(port: u16, redirect_uri: &str) -> OidcProvider {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    assert!(
        dir.join("node_modules/oidc-provider").exists(),
        "the test OpenID provider is not installed: run scripts/test (it runs npm ci in {})",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg("provider.mjs")
        .args([&port.to_string(), CLIENT_ID, CLIENT_SECRET, redirect_uri])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node (scripts/test needs node for the OpenID provider)");
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    // Keep reading what it prints, so it never writes to a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    assert!(line.starts_with("ready "), "the OpenID provider did not start: {line:?}");
    OidcProvider { child, issuer: line.trim_start_matches("ready ").trim().to_owned() }
}

/// What the GitHub stand-in remembers: each code's PKCE challenge and redirect URI.
#[derive(Default)]
struct GithubState {
    codes: HashMap<String, (String, String)>,
}

/// GitHub's OAuth app endpoints and user API, as GitHub documents them: the authorise
/// page approves at once; the token endpoint checks the client's credentials, the code,
/// the redirect URI and the PKCE verifier; `/api/user` and `/api/user/emails` answer for
/// the token it issued.
async fn github_stand_in() -> String {
    let state = Arc::new(Mutex::new(GithubState::default()));
    let authorize = {
        let state = state.clone();
        warp::path!("login" / "oauth" / "authorize").and(warp::query::<HashMap<String, String>>()).map(
            move |q: HashMap<String, String>| {
                assert_eq!(q.get("client_id").map(String::as_str), Some(CLIENT_ID));
                assert_eq!(q.get("code_challenge_method").map(String::as_str), Some("S256"));
                let scope = q.get("scope").cloned().unwrap_or_default();
                assert!(scope.contains("user:email"), "maas asks for the user's email addresses: {scope}");
                let code = format!("gh-code-{}", state.lock().unwrap().codes.len());
                state
                    .lock()
                    .unwrap()
                    .codes
                    .insert(code.clone(), (q["code_challenge"].clone(), q["redirect_uri"].clone()));
                let location = format!("{}?code={code}&state={}", q["redirect_uri"], q["state"]);
                warp::http::Response::builder().status(302).header("location", location).body(String::new()).unwrap()
            },
        )
    };
    let token = {
        let state = state.clone();
        warp::path!("login" / "oauth" / "access_token")
            .and(warp::post())
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::body::form::<HashMap<String, String>>())
            .map(move |auth: Option<String>, form: HashMap<String, String>| {
                let client_ok = auth.as_deref() == Some(basic(CLIENT_ID, CLIENT_SECRET).as_str());
                let issued = state.lock().unwrap().codes.remove(form.get("code").map_or("", String::as_str));
                let verifier = openidconnect::PkceCodeVerifier::new(form.get("code_verifier").cloned().unwrap_or_default());
                let challenge = openidconnect::PkceCodeChallenge::from_code_verifier_sha256(&verifier);
                let good = client_ok
                    && issued.is_some_and(|(expected, redirect)| {
                        expected == challenge.as_str() && form.get("redirect_uri") == Some(&redirect)
                    });
                let body = if good {
                    json!({"access_token": "gho_test_token", "token_type": "bearer", "scope": "read:user,user:email"})
                } else {
                    json!({"error": "bad_verification_code", "error_description": "The code passed is incorrect or expired."})
                };
                warp::reply::with_status(warp::reply::json(&body), if good { warp::http::StatusCode::OK } else { warp::http::StatusCode::BAD_REQUEST })
            })
    };
    let bearer = warp::header::exact("authorization", "Bearer gho_test_token");
    let user = warp::path!("api" / "user")
        .and(bearer)
        .map(|| warp::reply::json(&json!({"id": 4242, "login": "dave", "name": "Dave Hub", "email": null})));
    let emails = warp::path!("api" / "user" / "emails").and(bearer).map(|| {
        warp::reply::json(&json!([
            {"email": "dave-old@example.com", "primary": false, "verified": true},
            {"email": "Dave@Example.com", "primary": true, "verified": true},
        ]))
    });
    let routes = authorize.or(token).or(user).or(emails);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    base
}

/// `Authorization: Basic` as RFC 6749 §2.3.1 builds it.
fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

/// A browser: follows redirects itself, keeps cookies by name (every server here is
/// 127.0.0.1, and browsers share cookies across a host's ports), fills in the OpenID
/// provider's login and consent forms.
struct Browser {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    fn new() -> Self {
        Browser {
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    fn keep_cookies(&mut self, response: &reqwest::Response) {
        for header in response.headers().get_all("set-cookie") {
            let text = header.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() || text.to_ascii_lowercase().contains("max-age=0") {
                self.cookies.remove(name.trim());
            } else {
                self.cookies.insert(name.trim().to_owned(), value.to_owned());
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let response = self.http.get(url).header("cookie", self.cookie_header()).send().await.unwrap();
        self.keep_cookies(&response);
        response
    }

    async fn post_form(&mut self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let response = self.http.post(url).header("cookie", self.cookie_header()).form(form).send().await.unwrap();
        self.keep_cookies(&response);
        response
    }

    /// From the start URL through the provider, as `login`, to the URL the provider sends
    /// the browser back to (not followed).
    async fn through_provider(&mut self, start: &str, login: &str) -> String {
        let mut url = start.to_owned();
        for _ in 0..20 {
            if url.contains("/callback?") {
                return url;
            }
            let response = self.get(&url).await;
            let here = response.url().clone();
            if let Some(location) = response.headers().get("location") {
                url = here.join(location.to_str().unwrap()).unwrap().to_string();
                continue;
            }
            let status = response.status();
            let page = response.text().await.unwrap();
            assert_eq!(status, 200, "{url}: {page}");
            let action = page.split("action=\"").nth(1).and_then(|rest| rest.split('"').next()).expect("a form");
            let action = here.join(action).unwrap().to_string();
            let response = if page.contains("value=\"login\"") {
                self.post_form(&action, &[("prompt", "login"), ("login", login), ("password", "any")]).await
            } else {
                assert!(page.contains("value=\"consent\""), "an unexpected page: {page}");
                self.post_form(&action, &[("prompt", "consent")]).await
            };
            let location = response.headers().get("location").expect("the form redirects").to_str().unwrap();
            url = here.join(location).unwrap().to_string();
        }
        panic!("the provider did not send the browser back")
    }
}

struct Platform {
    base: String,
    state: Arc<AppState>,
    _trigger: maas_gateway::ShutdownTrigger,
    _dir: tempfile::TempDir,
}

async fn platform(oauth: Vec<OAuthProvider>) -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthOptions { oauth, ..AuthOptions::default() };
    let state = Arc::new(AppState::new("oauth-node", GatewayOptions { auth, ..GatewayOptions::default() }));
    common::open_stores(&state, maas_store::db::sqlite_url_in(dir.path()), dir.path()).await;
    let (base, trigger) = common::serve(&state).await;
    Platform { base, state, _trigger: trigger, _dir: dir }
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Signs in through `provider` as `login`; the callback's response.
async fn sign_in(browser: &mut Browser, base: &str, provider: &str, login: &str) -> reqwest::Response {
    let start = format!("{base}/v1/auth/oauth/{provider}/start?return_to=/console/models");
    let callback = browser.through_provider(&start, login).await;
    browser.get(&callback).await
}

async fn whoami(browser: &mut Browser, base: &str) -> Value {
    let (status, body) = json_of(browser.get(&format!("{base}/v1/auth/me")).await).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn provider(name: &str, kind: ProviderKind, issuer_url: &str) -> OAuthProvider {
    OAuthProvider {
        name: name.into(),
        kind,
        issuer_url: issuer_url.into(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        ..OAuthProvider::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openid_connect_sign_in_makes_links_and_refuses_what_it_must() {
    let oidc_port = free_port();
    let issuer = format!("http://127.0.0.1:{oidc_port}");
    let down = format!("http://127.0.0.1:{}", free_port());
    let p = platform(vec![
        OAuthProvider { display_name: "Corp SSO".into(), ..provider("corp", ProviderKind::Oidc, &issuer) },
        provider("down", ProviderKind::Oidc, &down),
    ])
    .await;
    let oidc = start_oidc_provider(oidc_port, &format!("{}/v1/auth/oauth/corp/callback", p.base));
    assert_eq!(oidc.issuer, issuer);
    let base = p.base.as_str();

    let (status, listed) = json_of(reqwest::get(format!("{base}/v1/auth/oauth")).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"][0]["display_name"], "Corp SSO");
    assert_eq!(listed["data"][0]["start_url"], "/v1/auth/oauth/corp/start");

    // The first account on the platform, made through the provider, is its administrator.
    let mut alice = Browser::new();
    let landed = sign_in(&mut alice, base, "corp", "alice").await;
    assert_eq!(landed.status(), 200);
    let page = landed.text().await.unwrap();
    assert!(page.contains("url=/console/models"), "the page goes on to return_to: {page}");
    assert!(alice.cookies.contains_key("maas_session") && !alice.cookies.contains_key("maas_oauth_state"));
    let me = whoami(&mut alice, base).await;
    assert_eq!((me["user"]["email"].as_str(), me["user"]["role"].as_str()), (Some("alice@oidc.test"), Some("admin")));
    assert_eq!(me["user"]["display_name"], "Test alice");
    let alice_id = me["user"]["id"].as_str().unwrap().to_owned();

    // Signing in again reaches the same account; the link is listed.
    let mut again = Browser::new();
    assert_eq!(sign_in(&mut again, base, "corp", "alice").await.status(), 200);
    assert_eq!(whoami(&mut again, base).await["user"]["id"], alice_id.as_str());
    let (_, identities) = json_of(again.get(&format!("{base}/v1/auth/identities")).await).await;
    assert_eq!(identities["data"].as_array().unwrap().len(), 1, "{identities}");
    assert_eq!(identities["data"][0]["provider"], "corp");

    // A callback works once; without the state cookie of the browser that started it, or
    // with a code the provider did not issue, it fails.
    let mut mallory = Browser::new();
    let start = format!("{base}/v1/auth/oauth/corp/start");
    let callback = mallory.through_provider(&start, "mallory").await;
    let (status, body) = json_of(Browser::new().get(&callback).await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("oauth_state_mismatch")), "{body}");
    let forged = callback.replace("code=", "code=forged");
    let (status, body) = json_of(mallory.get(&forged).await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("oauth_rejected")), "{body}");
    let (status, body) = json_of(mallory.get(&callback).await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("oauth_state_expired")), "a spent state: {body}");

    // An address the provider does not vouch for is refused.
    let mut unverified = Browser::new();
    let (status, body) = json_of(sign_in(&mut unverified, base, "corp", "unverified-bob").await).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("did not confirm an email"), "{body}");

    // An existing password account with the vouched-for address is linked, not duplicated.
    let carol = p
        .state
        .stores()
        .unwrap()
        .db
        .users()
        .create(maas_store::repo::users::NewUser {
            email: Some("carol@oidc.test".into()),
            display_name: "Carol".into(),
            active: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut carol_browser = Browser::new();
    assert_eq!(sign_in(&mut carol_browser, base, "corp", "carol").await.status(), 200);
    let me = whoami(&mut carol_browser, base).await;
    assert_eq!((me["user"]["id"].as_str(), me["user"]["role"].as_str()), (Some(carol.id.as_str()), Some("user")));

    // Bad starts: another site as return_to, an unknown provider, a provider that is down.
    let mut browser = Browser::new();
    let (status, body) =
        json_of(browser.get(&format!("{base}/v1/auth/oauth/corp/start?return_to=//evil.test/")).await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_return_to")));
    let (status, _) = json_of(browser.get(&format!("{base}/v1/auth/oauth/nope/start")).await).await;
    assert_eq!(status, 404);
    let (status, body) = json_of(browser.get(&format!("{base}/v1/auth/oauth/down/start")).await).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("could not be reached"), "{body}");

    // The audit log says who signed in how.
    let audit = p
        .state
        .stores()
        .unwrap()
        .db
        .audit()
        .list(&maas_store::repo::audit::AuditFilter { limit: 1000, ..Default::default() })
        .await
        .unwrap();
    let actions: Vec<(String, Value)> = audit.iter().map(|e| (e.action.clone(), e.detail.clone())).collect();
    assert!(actions.iter().any(|(a, d)| a == "auth.sign_up" && d["provider"] == "corp" && d["first_account"] == true));
    assert!(actions.iter().any(|(a, d)| a == "auth.identity_link" && d["provider"] == "corp"));
    assert!(actions.iter().filter(|(a, d)| a == "auth.sign_in" && d["method"] == "oauth").count() >= 3, "{actions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_sign_in_uses_the_verified_primary_address() {
    let github = github_stand_in().await;
    let p = platform(vec![OAuthProvider {
        name: "github".into(),
        kind: ProviderKind::Github,
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        authorize_url: format!("{github}/login/oauth/authorize"),
        token_url: format!("{github}/login/oauth/access_token"),
        api_url: format!("{github}/api"),
        ..OAuthProvider::default()
    }])
    .await;
    let base = p.base.as_str();
    let mut dave = Browser::new();
    let landed = sign_in(&mut dave, base, "github", "dave").await;
    assert_eq!(landed.status(), 200, "{}", landed.text().await.unwrap());
    let me = whoami(&mut dave, base).await;
    assert_eq!(me["user"]["email"], "dave@example.com", "the verified primary address, lowercased: {me}");
    assert_eq!(me["user"]["display_name"], "Dave Hub");
    let (_, identities) = json_of(dave.get(&format!("{base}/v1/auth/identities")).await).await;
    assert_eq!(identities["data"][0]["subject"], "4242", "GitHub's numeric user id: {identities}");

    // A replayed callback does not sign anyone in, even with the browser's state cookie.
    let mut other = Browser::new();
    let start = format!("{base}/v1/auth/oauth/github/start");
    let callback = other.through_provider(&start, "dave").await;
    let state_cookie = other.cookies["maas_oauth_state"].clone();
    assert_eq!(other.get(&callback).await.status(), 200);
    assert!(!other.cookies.contains_key("maas_oauth_state"), "the callback clears the state cookie");
    other.cookies.insert("maas_oauth_state".into(), state_cookie);
    let (status, body) = json_of(other.get(&callback).await).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("oauth_state_expired")), "{body}");
}
