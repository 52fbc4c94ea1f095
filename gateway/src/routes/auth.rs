//! Accounts: sign-up with an email address or phone number and a password, verification
//! by a one-time code, sign-in (a session token, and the console's HTTP-only cookie),
//! sign-out, password change and reset, and the caller's sessions.
//!
//! The first account made on a node becomes its administrator, active at once. Codes go
//! to the outbox (`GET /v1/admin/outbox`) and to the log; a configured SMTP server or SMS
//! provider would send them from there. Failed sign-ins are throttled per account and per
//! address through the quota counters (Redis when configured).

use std::sync::Arc;

use maas_store::repo::audit::NewAuditEntry;
use maas_store::repo::credentials::CodePurpose;
use maas_store::repo::users::{NewUser, Role, User};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::auth::password::{self, check_strength};
use crate::auth::secrets::{new_code, new_session_token, sha256_hex};
use crate::auth::{Access, Caller, Credential, SESSION_COOKIE, caller};
use crate::error::ApiError;
use crate::middleware::RequestContext;
use crate::state::AppState;

/// How long a verification or reset code works.
const CODE_TTL_MS: i64 = 15 * 60 * 1000;
/// An address may fail this many times the per-account limit before it is throttled too.
const ADDRESS_FAILURE_FACTOR: u64 = 4;

pub(crate) fn client_address() -> impl Filter<Extract = (String,), Error = std::convert::Infallible> + Clone {
    warp::ext::optional::<RequestContext>()
        .map(|context: Option<RequestContext>| context.map(|c| c.client_addr.ip().to_string()).unwrap_or_default())
}

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let signup = warp::path!("v1" / "auth" / "signup")
        .and(warp::post())
        .and(with_state(state))
        .and(client_address())
        .and(crate::json::json_body::<SignUp>(16 * 1024))
        .and_then(|s: Arc<AppState>, address: String, body: SignUp| async move {
            sign_up(&s, &address, body).await.map_err(warp::reject::custom)
        });
    let verify = warp::path!("v1" / "auth" / "verify")
        .and(warp::post())
        .and(with_state(state))
        .and(client_address())
        .and(crate::json::json_body::<Verify>(4 * 1024))
        .and_then(|s: Arc<AppState>, address: String, body: Verify| async move {
            verify_account(&s, &address, body).await.map_err(warp::reject::custom)
        });
    let send_code = warp::path!("v1" / "auth" / "codes")
        .and(warp::post())
        .and(with_state(state))
        .and(crate::json::json_body::<CodeRequest>(4 * 1024))
        .and_then(|s: Arc<AppState>, body: CodeRequest| async move {
            request_code(&s, body).await.map_err(warp::reject::custom)
        });
    let sign_in_route = warp::path!("v1" / "auth" / "login")
        .and(warp::post())
        .and(with_state(state))
        .and(client_address())
        .and(warp::header::optional::<String>("user-agent"))
        .and(crate::json::json_body::<SignIn>(16 * 1024))
        .and_then(|s: Arc<AppState>, address: String, agent: Option<String>, body: SignIn| async move {
            sign_in(&s, &address, agent.as_deref().unwrap_or_default(), body).await.map_err(warp::reject::custom)
        });
    let reset = warp::path!("v1" / "auth" / "password" / "reset")
        .and(warp::post())
        .and(with_state(state))
        .and(client_address())
        .and(crate::json::json_body::<ResetPassword>(16 * 1024))
        .and_then(|s: Arc<AppState>, address: String, body: ResetPassword| async move {
            reset_password(&s, &address, body).await.map_err(warp::reject::custom)
        });
    let public = signup.or(verify).unify().or(send_code).unify().or(sign_in_route).unify().or(reset).unify();

    let sign_out_route = warp::path!("v1" / "auth" / "logout")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|s: Arc<AppState>, c: Caller| async move { sign_out(&s, &c).await.map_err(warp::reject::custom) });
    let me = warp::path!("v1" / "auth" / "me")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(|s: Arc<AppState>, c: Caller| async move { whoami(&s, &c).await.map_err(warp::reject::custom) });
    let change = warp::path!("v1" / "auth" / "password")
        .and(warp::post())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::json_body::<ChangePassword>(16 * 1024))
        .and_then(|s: Arc<AppState>, c: Caller, body: ChangePassword| async move {
            change_password(&s, &c, body).await.map_err(warp::reject::custom)
        });
    let list_sessions = warp::path!("v1" / "auth" / "sessions")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(
            |s: Arc<AppState>, c: Caller| async move { list_sign_ins(&s, &c).await.map_err(warp::reject::custom) },
        );
    let revoke = warp::path!("v1" / "auth" / "sessions" / String)
        .and(warp::delete())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and_then(|id: String, s: Arc<AppState>, c: Caller| async move {
            revoke_sign_in(&s, &c, &id).await.map_err(warp::reject::custom)
        });
    public
        .or(sign_out_route)
        .unify()
        .or(me)
        .unify()
        .or(change)
        .unify()
        .or(list_sessions)
        .unify()
        .or(revoke)
        .unify()
        .boxed()
}

/// A new account.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignUp {
    pub email: Option<String>,
    /// E.164, e.g. `+8613800000000`.
    pub phone: Option<String>,
    pub password: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// The account's email address or phone number.
    pub login: String,
    pub code: String,
}

/// Asks for a new code: `verify` (the account is not active yet) or `reset` (a forgotten
/// password).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    pub login: String,
    pub purpose: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub login: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    pub current_password: String,
    pub new_password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    pub login: String,
    pub code: String,
    pub new_password: String,
}

fn created(value: &impl serde::Serialize) -> Response {
    warp::reply::with_status(warp::reply::json(value), http::StatusCode::CREATED).into_response()
}

pub(crate) fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else { return false };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.len() <= 254
        && !email.chars().any(char::is_whitespace)
}

fn valid_phone(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or(phone);
    (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Hashes off the async workers (argon2 takes tens of milliseconds).
async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || password::hash(&password))
        .await
        .map_err(|_| ApiError::internal("hashing the password failed"))
}

async fn verify_password(password: String, stored: Option<String>) -> bool {
    // A user without a password (or no user) still costs one verification against a
    // real hash, so response times do not tell which accounts exist.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let dummy = DUMMY.get_or_init(|| password::hash("no account has this password"));
        let matched = password::verify(&password, stored.as_deref().unwrap_or(dummy));
        matched && stored.is_some()
    })
    .await
    .unwrap_or(false)
}

/// Writes a message to the outbox, then delivers it by email or SMS where a transport is
/// configured (in the background: the outbox records the outcome); without one, the
/// message waits in the outbox and is written to the log for an administrator.
async fn send_message(state: &AppState, user: &User, subject: &str, body: &str) -> Result<(), ApiError> {
    let (channel, recipient) = match (&user.email, &user.phone) {
        (Some(email), _) => ("email", email.clone()),
        (None, Some(phone)) => ("sms", phone.clone()),
        (None, None) => return Ok(()),
    };
    let db = state.stores()?.db.clone();
    let message = db.outbox().push(channel, &recipient, subject, body).await?;
    if state.notifier.delivers(channel) {
        let notifier = std::sync::Arc::clone(&state.notifier);
        tokio::spawn(async move { notifier.deliver(&db, &message).await });
    } else {
        tracing::info!(message_id = %message.id, channel, recipient = %recipient, subject, body,
            "message queued in the outbox: no {channel} transport is configured (read it with maas admin outbox)");
    }
    Ok(())
}

async fn issue_code(state: &AppState, user: &User, purpose: CodePurpose) -> Result<(), ApiError> {
    let code = new_code();
    state.stores()?.db.credentials().create_code(&user.id, purpose, &sha256_hex(&code), CODE_TTL_MS).await?;
    let (subject, body) = match purpose {
        CodePurpose::Verify => {
            ("verify your maas account", format!("Your maas verification code is {code}. It works for 15 minutes."))
        }
        CodePurpose::Reset => (
            "reset your maas password",
            format!(
                "Your maas password reset code is {code}. It works for 15 minutes. If you did not ask for it, ignore this message."
            ),
        ),
    };
    send_message(state, user, subject, &body).await
}

pub(crate) async fn audit(state: &AppState, entry: NewAuditEntry) -> Result<(), ApiError> {
    state.stores()?.db.audit().append(entry).await?;
    Ok(())
}

pub(crate) fn anonymous_entry(address: &str, action: &str, target: &str, detail: serde_json::Value) -> NewAuditEntry {
    NewAuditEntry {
        address: address.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        detail,
        ..NewAuditEntry::default()
    }
}

/// Creates an account. The first account on the node becomes the administrator and is
/// active at once; later ones are `pending` until verified when `auth.require_verification`.
#[utoipa::path(post, path = "/v1/auth/signup", tag = "accounts", request_body = SignUp,
    responses((status = 201, description = "the account", body = SignUpReply), (status = 400, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn sign_up(state: &AppState, address: &str, body: SignUp) -> Result<Response, ApiError> {
    let db = &state.stores()?.db;
    let first = !db.credentials().has_accounts().await?;
    if !first && !state.options.auth.allow_signup {
        return Err(ApiError::forbidden(
            "sign-up is closed on this platform (auth.allow_signup): ask an administrator for an account",
        ));
    }
    let mut active = first || !state.options.auth.require_verification;
    let mut user = checked_account(state, body, if first { Role::Admin } else { Role::User }, active).await?;
    let first = first && db.credentials().claim_first_admin(&user.id).await?;
    if user.role == Role::Admin && !first {
        // Another sign-up raced this one to be first and won: this is an ordinary account.
        db.users().set_role(&user.id, Role::User).await?;
        active = !state.options.auth.require_verification;
        if !active {
            db.users().set_status(&user.id, "pending").await?;
        }
        user = db.users().get(&user.id).await?;
    }
    if !active {
        issue_code(state, &user, CodePurpose::Verify).await?;
    }
    audit(
        state,
        NewAuditEntry {
            actor_user_id: Some(user.id.clone()),
            ..anonymous_entry(address, "auth.sign_up", &user.id, json!({"role": user.role, "first_account": first}))
        },
    )
    .await?;
    let next = if active {
        "sign in with POST /v1/auth/login"
    } else {
        "enter the code sent to you with POST /v1/auth/verify"
    };
    Ok(created(&SignUpReply { user, verification_required: !active, next }))
}

/// A new account.
#[derive(Debug, Serialize, ToSchema)]
pub struct SignUpReply {
    pub user: User,
    /// Whether the account waits for its code (`POST /v1/auth/verify`).
    pub verification_required: bool,
    /// What to do next.
    pub next: &'static str,
}

/// A session opened by signing in.
#[derive(Debug, Serialize, ToSchema)]
pub struct SignInReply {
    /// The session token (`Authorization: Bearer maas_st_...`); the console gets it as a cookie.
    pub token: String,
    pub session_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub user: User,
}

/// The credential a request came with.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CredentialView {
    Session { session_id: String },
    ApiKey { key_id: String, prefix: String, scopes: Vec<maas_store::repo::keys::KeyScope> },
    ClusterCookie,
    Internal,
}

/// Who the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub user: User,
    /// The user itself, or the organisation it acts for.
    pub acting_as: maas_store::Owner,
    pub orgs: Vec<maas_store::repo::orgs::Org>,
    pub credential: CredentialView,
}

/// An active account with `role`, made by an administrator.
pub(crate) async fn create_account(state: &AppState, body: SignUp, role: Role) -> Result<User, ApiError> {
    checked_account(state, body, role, true).await
}

/// Checks a new account's login and password and stores it.
async fn checked_account(state: &AppState, body: SignUp, role: Role, active: bool) -> Result<User, ApiError> {
    let email = body.email.map(|e| e.trim().to_lowercase()).filter(|e| !e.is_empty());
    let phone = body.phone.map(|p| p.trim().to_owned()).filter(|p| !p.is_empty());
    if email.is_none() && phone.is_none() {
        return Err(ApiError::bad_request("missing_login", "sign up with an email address or a phone number")
            .with_param("email"));
    }
    if let Some(email) = &email
        && !valid_email(email)
    {
        return Err(
            ApiError::bad_request("invalid_email", format!("`{email}` is not an email address")).with_param("email")
        );
    }
    if let Some(phone) = &phone
        && !valid_phone(phone)
    {
        return Err(ApiError::bad_request("invalid_phone", "a phone number is 6 to 15 digits, optionally after a +")
            .with_param("phone"));
    }
    let display_name = body.display_name.unwrap_or_default().trim().chars().take(100).collect::<String>();
    let inputs: Vec<&str> =
        [email.as_deref(), phone.as_deref(), Some(display_name.as_str())].into_iter().flatten().collect();
    check_strength(&body.password, state.options.auth.min_password_score, &inputs)
        .map_err(|weak| ApiError::bad_request("weak_password", weak.0).with_param("password"))?;
    let display_name = if display_name.is_empty() {
        email.clone().or_else(|| phone.clone()).unwrap_or_default()
    } else {
        display_name
    };
    let password_hash = Some(hash_password(body.password).await?);
    Ok(state
        .stores()?
        .db
        .users()
        .create(NewUser { email, phone, display_name, password_hash, role: Some(role), active })
        .await?)
}

/// Activates an account with the code it was sent.
#[utoipa::path(post, path = "/v1/auth/verify", tag = "accounts", request_body = Verify,
    responses((status = 200, description = "the account is active", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn verify_account(state: &AppState, address: &str, body: Verify) -> Result<Response, ApiError> {
    let db = &state.stores()?.db;
    let wrong = || {
        ApiError::bad_request(
            "invalid_code",
            "the code is wrong or has expired: ask for a new one with POST /v1/auth/codes",
        )
    };
    let Some((user, _)) = db.users().find_for_sign_in(&body.login).await? else { return Err(wrong()) };
    if user.status == "active" {
        return Ok(warp::reply::json(&json!({"user": user, "already_active": true})).into_response());
    }
    if user.status != "pending"
        || !db.credentials().redeem_code(&user.id, CodePurpose::Verify, &sha256_hex(body.code.trim())).await?
    {
        return Err(wrong());
    }
    db.users().set_status(&user.id, "active").await?;
    audit(
        state,
        NewAuditEntry {
            actor_user_id: Some(user.id.clone()),
            ..anonymous_entry(address, "auth.verify", &user.id, json!({}))
        },
    )
    .await?;
    let user = db.users().get(&user.id).await?;
    Ok(warp::reply::json(&json!({"user": user})).into_response())
}

/// Sends a new code. Always 202, so the answer does not tell which accounts exist.
#[utoipa::path(post, path = "/v1/auth/codes", tag = "accounts", request_body = CodeRequest,
    responses((status = 202, description = "a code was sent if the account exists", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn request_code(state: &AppState, body: CodeRequest) -> Result<Response, ApiError> {
    let purpose = match body.purpose.as_str() {
        "verify" => CodePurpose::Verify,
        "reset" => CodePurpose::Reset,
        other => {
            return Err(ApiError::bad_request("invalid_purpose", format!("purpose `{other}` is not verify or reset"))
                .with_param("purpose"));
        }
    };
    let db = &state.stores()?.db;
    if let Some((user, _)) = db.users().find_for_sign_in(&body.login).await? {
        let wanted = match purpose {
            CodePurpose::Verify => user.status == "pending",
            CodePurpose::Reset => user.status != "disabled",
        };
        if wanted {
            issue_code(state, &user, purpose).await?;
        }
    }
    Ok(warp::reply::with_status(warp::reply::json(&json!({"sent": true})), http::StatusCode::ACCEPTED).into_response())
}

fn throttled(retry_after_secs: u64) -> ApiError {
    ApiError::new(
        http::StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "sign_in_throttled",
        format!("too many failed sign-ins: try again in {retry_after_secs} s, or reset the password"),
    )
    .with_retry_after(retry_after_secs)
}

/// Signs in: a session token in the body (for API clients) and in an HTTP-only cookie
/// (for the console). Repeated failures for an account or from an address are refused
/// with 429 for a while.
#[utoipa::path(post, path = "/v1/auth/login", tag = "accounts", request_body = SignIn,
    responses((status = 200, description = "the session", body = SignInReply), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
pub async fn sign_in(state: &AppState, address: &str, user_agent: &str, body: SignIn) -> Result<Response, ApiError> {
    let options = &state.options.auth;
    let limiter = state.limiter();
    let now = maas_store::ids::now_ms();
    let account_key = format!("sign_in:{}", body.login.trim().to_lowercase());
    let address_key = format!("sign_in_address:{address}");
    let window = options.sign_in_window_secs;
    for (key, max) in [
        (&account_key, options.max_sign_in_failures),
        (&address_key, options.max_sign_in_failures * ADDRESS_FAILURE_FACTOR),
    ] {
        if let Some(retry) = limiter.failure_status(key, max, window, now).await?.retry_after_secs {
            return Err(throttled(retry));
        }
    }
    let db = &state.stores()?.db;
    let found = db.users().find_for_sign_in(&body.login).await?;
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), hash),
        None => (None, None),
    };
    if body.password.len() > password::MAX_PASSWORD_BYTES || !verify_password(body.password, hash).await {
        limiter.record_failure(&account_key, window, now).await?;
        limiter.record_failure(&address_key, window, now).await?;
        audit(
            state,
            NewAuditEntry {
                actor_user_id: user.as_ref().map(|u| u.id.clone()),
                ..anonymous_entry(address, "auth.sign_in_failed", body.login.trim(), json!({}))
            },
        )
        .await?;
        return Err(ApiError::unauthorized("invalid_credentials", "wrong login or password"));
    }
    let user = user.ok_or_else(|| ApiError::unauthorized("invalid_credentials", "wrong login or password"))?;
    match user.status.as_str() {
        "pending" => {
            return Err(ApiError::new(
                http::StatusCode::FORBIDDEN,
                "permission_error",
                "account_not_verified",
                "this account is not verified yet: enter the code sent to you with POST /v1/auth/verify",
            ));
        }
        "disabled" => return Err(account_disabled()),
        _ => {}
    }
    limiter.clear_failures(&account_key).await?;
    let (body, cookie) = open_session(state, &user, address, user_agent, json!({"method": "password"})).await?;
    Ok(warp::reply::with_header(warp::reply::json(&body), http::header::SET_COOKIE.as_str(), cookie).into_response())
}

pub(crate) fn account_disabled() -> ApiError {
    ApiError::new(
        http::StatusCode::FORBIDDEN,
        "permission_error",
        "account_disabled",
        "this account is disabled: ask an administrator",
    )
}

/// Opens a session for `user` (signed in by `detail.method`): the answer's body, with
/// the token, and the console's session cookie.
pub(crate) async fn open_session(
    state: &AppState,
    user: &User,
    address: &str,
    user_agent: &str,
    detail: serde_json::Value,
) -> Result<(SignInReply, String), ApiError> {
    let db = &state.stores()?.db;
    let token = new_session_token();
    let ttl_secs = state.options.auth.session_ttl_secs;
    let ttl_ms = i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2);
    let session = db.credentials().create_session(&user.id, &sha256_hex(&token), address, user_agent, ttl_ms).await?;
    let mut detail = detail;
    if let Some(detail) = detail.as_object_mut() {
        detail.insert("session_id".into(), json!(session.id));
    }
    audit(
        state,
        NewAuditEntry {
            actor_user_id: Some(user.id.clone()),
            ..anonymous_entry(address, "auth.sign_in", &user.id, detail)
        },
    )
    .await?;
    let secure = if state.options.auth.secure_cookies { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={ttl_secs}{secure}");
    let body =
        SignInReply { token, session_id: session.id, expires_at: session.expires_at_ms / 1000, user: user.clone() };
    Ok((body, cookie))
}

/// Signs out the session the request came with (its token or cookie stops working).
#[utoipa::path(post, path = "/v1/auth/logout", tag = "accounts",
    responses((status = 200, description = "signed out", content_type = "application/json"), (status = 401, body = crate::error::ErrorBody)))]
pub async fn sign_out(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let Credential::Session { session_id } = &caller.credential else {
        return Err(ApiError::bad_request(
            "not_a_session",
            "only a signed-in session can sign out; revoke an api key with DELETE /v1/keys/{id}",
        ));
    };
    state.stores()?.db.credentials().revoke_session(caller.user_id(), session_id).await?;
    state.auth_cache.clear();
    audit(state, caller.audit_entry("auth.sign_out", session_id, json!({}))).await?;
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok(warp::reply::with_header(
        warp::reply::json(&json!({"signed_out": true})),
        http::header::SET_COOKIE.as_str(),
        cookie,
    )
    .into_response())
}

/// Who the caller is: the account, the organisation acted for, and the credential.
#[utoipa::path(get, path = "/v1/auth/me", tag = "accounts",
    responses((status = 200, description = "the caller", body = Me), (status = 401, body = crate::error::ErrorBody)))]
pub async fn whoami(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let db = &state.stores()?.db;
    let user = db.users().get(caller.user_id()).await?;
    let orgs = db.orgs().list_for_user(caller.user_id()).await?;
    let credential = match &caller.credential {
        Credential::Session { session_id } => CredentialView::Session { session_id: session_id.clone() },
        Credential::ApiKey(key) => {
            CredentialView::ApiKey { key_id: key.id.clone(), prefix: key.prefix.clone(), scopes: key.scopes.clone() }
        }
        Credential::ClusterCookie => CredentialView::ClusterCookie,
        Credential::Internal => CredentialView::Internal,
    };
    let me = Me { user, acting_as: caller.scope.acting_as().clone(), orgs, credential };
    Ok(warp::reply::json(&me).into_response())
}

async fn set_new_password(
    state: &AppState,
    user_id: &str,
    new_password: String,
    inputs: &[&str],
) -> Result<u64, ApiError> {
    check_strength(&new_password, state.options.auth.min_password_score, inputs)
        .map_err(|weak| ApiError::bad_request("weak_password", weak.0).with_param("new_password"))?;
    let db = &state.stores()?.db;
    db.users().set_password_hash(user_id, &hash_password(new_password).await?).await?;
    let revoked = db.credentials().revoke_all_sessions(user_id).await?;
    state.auth_cache.clear();
    Ok(revoked)
}

/// Changes the caller's password; every session of the account is signed out.
#[utoipa::path(post, path = "/v1/auth/password", tag = "accounts", request_body = ChangePassword,
    responses((status = 200, description = "changed", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn change_password(state: &AppState, caller: &Caller, body: ChangePassword) -> Result<Response, ApiError> {
    let db = &state.stores()?.db;
    let user = db.users().get(caller.user_id()).await?;
    let login = user.email.clone().or_else(|| user.phone.clone()).unwrap_or_default();
    let hash = db.users().find_for_sign_in(&login).await?.and_then(|(_, hash)| hash);
    if !verify_password(body.current_password, hash).await {
        return Err(ApiError::unauthorized("invalid_credentials", "the current password is wrong"));
    }
    let revoked =
        set_new_password(state, &user.id, body.new_password, &[login.as_str(), user.display_name.as_str()]).await?;
    audit(state, caller.audit_entry("auth.password_change", &user.id, json!({"sessions_revoked": revoked}))).await?;
    Ok(warp::reply::json(&json!({"changed": true, "sessions_revoked": revoked})).into_response())
}

/// Sets a new password with a reset code (ask for one with `POST /v1/auth/codes`,
/// purpose `reset`); every session of the account is signed out.
#[utoipa::path(post, path = "/v1/auth/password/reset", tag = "accounts", request_body = ResetPassword,
    responses((status = 200, description = "reset", content_type = "application/json"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn reset_password(state: &AppState, address: &str, body: ResetPassword) -> Result<Response, ApiError> {
    let db = &state.stores()?.db;
    let wrong = || {
        ApiError::bad_request(
            "invalid_code",
            "the code is wrong or has expired: ask for a new one with POST /v1/auth/codes",
        )
    };
    let Some((user, _)) = db.users().find_for_sign_in(&body.login).await? else { return Err(wrong()) };
    if user.status == "disabled"
        || !db.credentials().redeem_code(&user.id, CodePurpose::Reset, &sha256_hex(body.code.trim())).await?
    {
        return Err(wrong());
    }
    let login = body.login.trim().to_owned();
    let revoked =
        set_new_password(state, &user.id, body.new_password, &[login.as_str(), user.display_name.as_str()]).await?;
    state.limiter().clear_failures(&format!("sign_in:{}", login.to_lowercase())).await?;
    audit(
        state,
        NewAuditEntry {
            actor_user_id: Some(user.id.clone()),
            ..anonymous_entry(address, "auth.password_reset", &user.id, json!({"sessions_revoked": revoked}))
        },
    )
    .await?;
    Ok(warp::reply::json(&json!({"reset": true, "sessions_revoked": revoked})).into_response())
}

/// The caller's sessions (sign-ins), newest first.
#[utoipa::path(get, path = "/v1/auth/sessions", tag = "accounts",
    responses((status = 200, description = "the sessions", body = super::ListOf<maas_store::repo::credentials::SessionInfo>), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_sign_ins(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let sessions = state.stores()?.db.credentials().list_sessions(caller.user_id()).await?;
    Ok(super::ListOf::reply(sessions))
}

/// Signs out one of the caller's sessions (another account's is not found).
#[utoipa::path(delete, path = "/v1/auth/sessions/{id}", tag = "accounts", params(("id" = String, Path, description = "the session's id")),
    responses((status = 200, description = "revoked", content_type = "application/json"), (status = 404, body = crate::error::ErrorBody)))]
pub async fn revoke_sign_in(state: &AppState, caller: &Caller, id: &str) -> Result<Response, ApiError> {
    state.stores()?.db.credentials().revoke_session(caller.user_id(), id).await?;
    state.auth_cache.clear();
    audit(state, caller.audit_entry("auth.session_revoke", id, json!({}))).await?;
    Ok(warp::reply::json(&json!({"id": id, "revoked": true})).into_response())
}
