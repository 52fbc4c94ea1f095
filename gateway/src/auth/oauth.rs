//! Sign-in through OAuth 2.0 and OpenID Connect providers (`[[auth.oauth]]`): GitHub (OAuth
//! 2.0 and its user API), Google and any OpenID Connect issuer (discovery, id tokens checked
//! against the issuer's published keys, the nonce, the audience and the expiry).
//!
//! Every sign-in uses PKCE (S256) and a random `state`; the state's SHA-256, the PKCE
//! verifier and the nonce wait in the database (`oauth_states`) until the provider sends the
//! browser back, so the callback may land on any node. The protocol work is done by the
//! maintained `openidconnect` and `oauth2` crates; this module only chooses the provider's
//! endpoints and turns what it says into an [`ExternalIdentity`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};

/// How long a provider's discovery document and keys are reused before they are fetched
/// again (keys rotate; a failed check also fetches them again).
const DISCOVERY_TTL: Duration = Duration::from_secs(300);

/// What kind of provider a `[[auth.oauth]]` entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Any OpenID Connect issuer (`issuer_url`), found through its discovery document.
    #[default]
    Oidc,
    /// Google's OpenID Connect issuer (`https://accounts.google.com` unless `issuer_url`).
    Google,
    /// GitHub's OAuth 2.0 apps, with the user's verified primary email from its API.
    Github,
}

/// One sign-in provider from the configuration (`[[auth.oauth]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthProvider {
    /// The name in URLs (`/v1/auth/oauth/{name}/start`): lowercase letters, digits, `-`.
    pub name: String,
    pub kind: ProviderKind,
    /// What the sign-in button says; the name when empty.
    pub display_name: String,
    /// The OpenID Connect issuer (required for `oidc`; Google's by default for `google`).
    pub issuer_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// Scopes asked for besides the ones sign-in needs (`openid email profile` for OpenID
    /// Connect, `read:user user:email` for GitHub).
    pub extra_scopes: Vec<String>,
    /// GitHub's authorisation endpoint (GitHub Enterprise Server has its own).
    pub authorize_url: String,
    /// GitHub's token endpoint.
    pub token_url: String,
    /// GitHub's REST API (`https://api.github.com`; `https://HOST/api/v3` on Enterprise).
    pub api_url: String,
}

impl Default for OAuthProvider {
    fn default() -> Self {
        OAuthProvider {
            name: String::new(),
            kind: ProviderKind::Oidc,
            display_name: String::new(),
            issuer_url: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            extra_scopes: Vec::new(),
            authorize_url: "https://github.com/login/oauth/authorize".into(),
            token_url: "https://github.com/login/oauth/access_token".into(),
            api_url: "https://api.github.com".into(),
        }
    }
}

impl OAuthProvider {
    /// The issuer whose discovery document and keys are used.
    pub fn issuer(&self) -> &str {
        match (self.kind, self.issuer_url.is_empty()) {
            (ProviderKind::Google, true) => "https://accounts.google.com",
            _ => &self.issuer_url,
        }
    }

    /// What the sign-in button says.
    pub fn label(&self) -> &str {
        if self.display_name.is_empty() { &self.name } else { &self.display_name }
    }

    /// Checks the entry; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 40
            && self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            return Err(("name", format!("`{}` is not a provider name: use 1 to 40 of a-z, 0-9 and -", self.name)));
        }
        if self.client_id.is_empty() {
            return Err(("client_id", format!("provider `{}` needs the client id the provider issued", self.name)));
        }
        let urls: &[(&'static str, &str)] = match self.kind {
            ProviderKind::Oidc | ProviderKind::Google => &[("issuer_url", self.issuer())],
            ProviderKind::Github => {
                &[("authorize_url", &self.authorize_url), ("token_url", &self.token_url), ("api_url", &self.api_url)]
            }
        };
        for (field, url) in urls {
            let parsed = openidconnect::url::Url::parse(url)
                .map_err(|err| (*field, format!("`{url}` of provider `{}` is not a URL: {err}", self.name)))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err((*field, format!("`{url}` of provider `{}` is not an http(s) URL", self.name)));
            }
        }
        Ok(())
    }
}

/// Who the provider says signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIdentity {
    /// The provider's stable id for the account (`sub`, or GitHub's numeric user id).
    pub subject: String,
    pub email: Option<String>,
    /// Whether the provider vouches that the account owns `email`.
    pub email_verified: bool,
    pub name: Option<String>,
}

/// A sign-in about to go to the provider.
#[derive(Debug)]
pub struct Authorization {
    /// Where the browser goes.
    pub url: String,
    pub state: String,
    pub pkce_verifier: String,
    /// The OpenID Connect nonce (empty for GitHub).
    pub nonce: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The provider could not be reached or answered with something unusable.
    #[error("the sign-in provider `{provider}` could not be reached or answered badly: {reason}")]
    Provider { provider: String, reason: String },
    /// The provider refused the code, or what it sent failed a check.
    #[error("sign-in through `{provider}` failed: {reason}")]
    Rejected { provider: String, reason: String },
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

type Discovered = (Instant, Arc<CoreProviderMetadata>);

/// A client built from an issuer's discovery document, with our redirect URI.
type OidcClient = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

/// The configured providers and what they published.
pub struct Providers {
    configured: Vec<OAuthProvider>,
    http: openidconnect::reqwest::Client,
    discovered: Mutex<HashMap<String, Discovered>>,
}

impl Providers {
    pub fn new(configured: Vec<OAuthProvider>) -> Self {
        // Redirects are not followed (an SSRF guard the openidconnect crate asks for).
        let http = openidconnect::reqwest::Client::builder()
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("maas/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Providers { configured, http, discovered: Mutex::new(HashMap::new()) }
    }

    pub fn list(&self) -> &[OAuthProvider] {
        &self.configured
    }

    pub fn get(&self, name: &str) -> Option<&OAuthProvider> {
        self.configured.iter().find(|p| p.name == name)
    }

    async fn metadata(&self, provider: &OAuthProvider, fresh: bool) -> Result<Arc<CoreProviderMetadata>, OAuthError> {
        if !fresh
            && let Some((at, metadata)) = self.discovered.lock().expect("discovery lock").get(&provider.name)
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(metadata.clone());
        }
        let unreachable = |reason: String| OAuthError::Provider { provider: provider.name.clone(), reason };
        let issuer = IssuerUrl::new(provider.issuer().to_owned()).map_err(|err| unreachable(err.to_string()))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|err| unreachable(format!("discovery at {}: {}", provider.issuer(), error_chain(&err))))?;
        let metadata = Arc::new(metadata);
        self.discovered
            .lock()
            .expect("discovery lock")
            .insert(provider.name.clone(), (Instant::now(), metadata.clone()));
        Ok(metadata)
    }

    /// Starts a sign-in: the provider's authorisation URL with a fresh state, PKCE
    /// challenge and (OpenID Connect) nonce.
    pub async fn begin(&self, provider: &OAuthProvider, redirect_uri: &str) -> Result<Authorization, OAuthError> {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        match provider.kind {
            ProviderKind::Oidc | ProviderKind::Google => {
                let metadata = self.metadata(provider, false).await?;
                let client = Self::oidc_client(provider, &metadata, redirect_uri)?;
                let mut request = client
                    .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
                    .add_scope(Scope::new("email".into()))
                    .add_scope(Scope::new("profile".into()))
                    .set_pkce_challenge(challenge);
                for scope in &provider.extra_scopes {
                    request = request.add_scope(Scope::new(scope.clone()));
                }
                let (url, state, nonce) = request.url();
                Ok(Authorization {
                    url: url.to_string(),
                    state: state.secret().clone(),
                    pkce_verifier: verifier.secret().clone(),
                    nonce: nonce.secret().clone(),
                })
            }
            ProviderKind::Github => {
                let redirect = oauth2::RedirectUrl::new(redirect_uri.to_owned())
                    .map_err(|err| OAuthError::Provider { provider: provider.name.clone(), reason: err.to_string() })?;
                let client = github_client(provider)?.set_redirect_uri(redirect);
                let mut request = client
                    .authorize_url(oauth2::CsrfToken::new_random)
                    .add_scope(oauth2::Scope::new("read:user".into()))
                    .add_scope(oauth2::Scope::new("user:email".into()))
                    .set_pkce_challenge(challenge);
                for scope in &provider.extra_scopes {
                    request = request.add_scope(oauth2::Scope::new(scope.clone()));
                }
                let (url, state) = request.url();
                Ok(Authorization {
                    url: url.to_string(),
                    state: state.secret().clone(),
                    pkce_verifier: verifier.secret().clone(),
                    nonce: String::new(),
                })
            }
        }
    }

    /// Finishes a sign-in: exchanges the code (with the PKCE verifier) and says who
    /// signed in, after checking the id token (OpenID Connect) or asking the API (GitHub).
    pub async fn finish(
        &self,
        provider: &OAuthProvider,
        redirect_uri: &str,
        pkce_verifier: &str,
        nonce: &str,
        code: &str,
    ) -> Result<ExternalIdentity, OAuthError> {
        match provider.kind {
            ProviderKind::Oidc | ProviderKind::Google => {
                self.finish_oidc(provider, redirect_uri, pkce_verifier, nonce, code).await
            }
            ProviderKind::Github => self.finish_github(provider, redirect_uri, pkce_verifier, code).await,
        }
    }

    fn oidc_client(
        provider: &OAuthProvider,
        metadata: &CoreProviderMetadata,
        redirect_uri: &str,
    ) -> Result<OidcClient, OAuthError> {
        let redirect = RedirectUrl::new(redirect_uri.to_owned())
            .map_err(|err| OAuthError::Provider { provider: provider.name.clone(), reason: err.to_string() })?;
        Ok(CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(provider.client_id.clone()),
            Some(ClientSecret::new(provider.client_secret.clone())),
        )
        .set_redirect_uri(redirect))
    }

    async fn finish_oidc(
        &self,
        provider: &OAuthProvider,
        redirect_uri: &str,
        pkce_verifier: &str,
        nonce: &str,
        code: &str,
    ) -> Result<ExternalIdentity, OAuthError> {
        let rejected = |reason: String| OAuthError::Rejected { provider: provider.name.clone(), reason };
        let unreachable = |reason: String| OAuthError::Provider { provider: provider.name.clone(), reason };
        let metadata = self.metadata(provider, false).await?;
        let client = Self::oidc_client(provider, &metadata, redirect_uri)?;
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|err| unreachable(format!("the issuer publishes no token endpoint: {err}")))?
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.to_owned()))
            .request_async(&self.http)
            .await
            .map_err(|err| token_error(&err, rejected, unreachable))?;
        let id_token = token.id_token().ok_or_else(|| rejected("the token response carries no id token".into()))?;
        let nonce = Nonce::new(nonce.to_owned());
        let claims = match id_token.claims(&client.id_token_verifier(), &nonce) {
            Ok(claims) => claims.clone(),
            Err(first) => {
                // The issuer may have rotated its signing keys since they were fetched:
                // check once more against the keys it publishes now.
                let metadata = self.metadata(provider, true).await?;
                let client = Self::oidc_client(provider, &metadata, redirect_uri)?;
                id_token
                    .claims(&client.id_token_verifier(), &nonce)
                    .cloned()
                    .map_err(|_| rejected(format!("the id token failed verification: {}", error_chain(&first))))?
            }
        };
        let mut identity = ExternalIdentity {
            subject: claims.subject().to_string(),
            email: claims.email().map(|email| email.to_string()),
            email_verified: claims.email_verified().unwrap_or(false),
            name: claims.name().and_then(|name| name.get(None)).map(|name| name.to_string()),
        };
        if identity.email.is_none() {
            // Issuers may keep scope claims out of the id token (OpenID Connect Core
            // §5.4): ask the userinfo endpoint, for the same subject.
            let info: openidconnect::core::CoreUserInfoClaims = client
                .user_info(token.access_token().clone(), Some(claims.subject().clone()))
                .map_err(|_| rejected("the id token has no email and the issuer has no userinfo endpoint".into()))?
                .request_async(&self.http)
                .await
                .map_err(|err| unreachable(format!("userinfo: {}", error_chain(&err))))?;
            identity.email = info.email().map(|email| email.to_string());
            identity.email_verified = info.email_verified().unwrap_or(false);
            if identity.name.is_none() {
                identity.name = info.name().and_then(|name| name.get(None)).map(|name| name.to_string());
            }
        }
        Ok(identity)
    }

    async fn finish_github(
        &self,
        provider: &OAuthProvider,
        redirect_uri: &str,
        pkce_verifier: &str,
        code: &str,
    ) -> Result<ExternalIdentity, OAuthError> {
        use oauth2::TokenResponse as _;
        let rejected = |reason: String| OAuthError::Rejected { provider: provider.name.clone(), reason };
        let unreachable = |reason: String| OAuthError::Provider { provider: provider.name.clone(), reason };
        let client = github_client(provider)?.set_redirect_uri(
            oauth2::RedirectUrl::new(redirect_uri.to_owned()).map_err(|err| unreachable(err.to_string()))?,
        );
        let token = client
            .exchange_code(oauth2::AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(oauth2::PkceCodeVerifier::new(pkce_verifier.to_owned()))
            .request_async(&self.http)
            .await
            .map_err(|err| token_error(&err, rejected, unreachable))?;
        let access_token = token.access_token().secret();
        let api = provider.api_url.trim_end_matches('/');
        let user: GithubUser = self.github_get(provider, &format!("{api}/user"), access_token).await?;
        let emails: Vec<GithubEmail> = self.github_get(provider, &format!("{api}/user/emails"), access_token).await?;
        let primary = emails.into_iter().find(|email| email.primary && email.verified);
        Ok(ExternalIdentity {
            subject: user.id.to_string(),
            email_verified: primary.is_some(),
            email: primary.map(|email| email.email).or(user.email),
            name: user.name.filter(|name| !name.is_empty()).or(Some(user.login)),
        })
    }

    async fn github_get<T: serde::de::DeserializeOwned>(
        &self,
        provider: &OAuthProvider,
        url: &str,
        access_token: &str,
    ) -> Result<T, OAuthError> {
        let unreachable = |reason: String| OAuthError::Provider {
            provider: provider.name.clone(),
            reason: format!("{url}: {reason}"),
        };
        let response = self
            .http
            .get(url)
            .bearer_auth(access_token)
            .header("accept", "application/vnd.github+json")
            .send()
            .await
            .map_err(|err| unreachable(error_chain(&err)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(unreachable(format!("answered {status}")));
        }
        response.json().await.map_err(|err| unreachable(error_chain(&err)))
    }
}

#[derive(Deserialize)]
struct GithubUser {
    id: u64,
    login: String,
    name: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct GithubEmail {
    email: String,
    primary: bool,
    verified: bool,
}

type GithubClient = oauth2::basic::BasicClient<
    oauth2::EndpointSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

fn github_client(provider: &OAuthProvider) -> Result<GithubClient, OAuthError> {
    let invalid = |reason: String| OAuthError::Provider { provider: provider.name.clone(), reason };
    Ok(oauth2::basic::BasicClient::new(oauth2::ClientId::new(provider.client_id.clone()))
        .set_client_secret(oauth2::ClientSecret::new(provider.client_secret.clone()))
        .set_auth_uri(oauth2::AuthUrl::new(provider.authorize_url.clone()).map_err(|err| invalid(err.to_string()))?)
        .set_token_uri(oauth2::TokenUrl::new(provider.token_url.clone()).map_err(|err| invalid(err.to_string()))?))
}

/// A refused code (the provider's own error) is the user's to retry; anything else means
/// the provider could not be used.
fn token_error<RE, T>(
    err: &oauth2::RequestTokenError<RE, T>,
    rejected: impl FnOnce(String) -> OAuthError,
    unreachable: impl FnOnce(String) -> OAuthError,
) -> OAuthError
where
    RE: std::error::Error + 'static,
    T: oauth2::ErrorResponse + 'static,
{
    match err {
        oauth2::RequestTokenError::ServerResponse(response) => {
            rejected(format!("the provider refused the code: {response}"))
        }
        other => unreachable(error_chain(other)),
    }
}
