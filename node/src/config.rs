//! `cluster.toml`: the node's configuration.
//!
//! Loading is: the file (or nothing, for `maas up`) → `MAAS_SECTION__KEY` environment
//! overrides → serde with `deny_unknown_fields` (a wrong key or type names its path) →
//! [`Config::validate`] (cross-field rules, naming the key and what is allowed). Every key
//! and its default is written in the `cluster.toml` at the repository root.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

/// A configuration error: one line naming the key, what was wrong, and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub listen: ListenConfig,
    pub cluster: ClusterConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub milvus: MilvusConfig,
    pub knowledge: KnowledgeConfig,
    pub tls: TlsConfig,
    pub gateway: GatewayConfig,
    pub auth: AuthConfig,
    pub smtp: SmtpConfig,
    pub sms: SmsConfig,
    pub quota: QuotaConfig,
    pub response_cache: ResponseCacheConfig,
    pub safety: SafetyConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The node's id in the cluster, unique and stable across restarts; 1 or more.
    #[serde(deserialize_with = "non_negative")]
    pub id: u64,
    pub name: String,
    pub data_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// Memory kept free on every GPU (CUDA context, fragmentation), in MiB.
    #[serde(deserialize_with = "non_negative")]
    pub gpu_memory_reserve_mib: u64,
    pub simulated_gpus: Vec<SimulatedGpu>,
}

/// GPUs this node reports although it has no such hardware, so scheduling can be run
/// and tested on machines without GPUs. They are flagged as simulated everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedGpu {
    pub model: String,
    #[serde(deserialize_with = "non_negative")]
    pub memory_mib: u64,
    #[serde(default = "one", deserialize_with = "non_negative")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// HTTP API and console.
    #[serde(deserialize_with = "socket_addr")]
    pub api: SocketAddr,
    /// Cluster traffic between nodes (raft and actors).
    #[serde(deserialize_with = "socket_addr")]
    pub cluster: SocketAddr,
}

/// The control plane's raft timing. Elections start after `election_ticks` ticks without
/// a leader (randomised up to twice that); leaders send heartbeats every
/// `heartbeat_ticks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The shared secret of the cluster: nodes with another cookie are refused, and
    /// joining or removing members needs it.
    pub cookie: String,
    /// API addresses of running members to join through when this node's raft log is
    /// empty (`maas node start --join URL` adds to it). Empty: start a new cluster.
    pub join: Vec<String>,
    #[serde(deserialize_with = "non_negative")]
    pub raft_tick_ms: u64,
    #[serde(deserialize_with = "non_negative")]
    pub election_ticks: u64,
    #[serde(deserialize_with = "non_negative")]
    pub heartbeat_ticks: u64,
    /// Applied entries between snapshots of the cluster state (which compact the log).
    #[serde(deserialize_with = "non_negative")]
    pub snapshot_interval_entries: u64,
    /// The leader marks a node it has not heard from for this long as suspect...
    #[serde(deserialize_with = "non_negative")]
    pub suspect_after_ms: u64,
    /// ...and commits it dead after this grace period; its work is then placed elsewhere.
    #[serde(deserialize_with = "non_negative")]
    pub dead_after_ms: u64,
    /// A node declared dead must be heard without a break this long (doubled for each
    /// earlier dead declaration, up to a minute) before it is alive again.
    #[serde(deserialize_with = "non_negative")]
    pub rejoin_stable_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            cookie: DEFAULT_COOKIE.into(),
            join: Vec::new(),
            raft_tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 10_000,
            suspect_after_ms: 1500,
            dead_after_ms: 5000,
            rejoin_stable_ms: 3000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Empty: a SQLite file in the data directory. Otherwise `sqlite:PATH` or
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DB`.
    pub url: String,
    #[serde(deserialize_with = "non_negative")]
    pub max_connections: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Empty: counters, cache and pub/sub stay in-process (single node only).
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MilvusConfig {
    /// Empty: the embedded vector index.
    pub url: String,
}

/// Knowledge bases: where new ones keep their vectors, and how documents are ingested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnowledgeConfig {
    /// Where a knowledge base created without a `vector_backend` keeps its vectors:
    /// `embedded` or `milvus` (which needs `milvus.url`).
    pub default_backend: String,
    /// The embedding deployment of a knowledge base created without one; empty: the
    /// request must name one.
    pub default_embedding_model: String,
    /// Shards of a new knowledge base's embedded index.
    #[serde(deserialize_with = "non_negative")]
    pub default_shards: u64,
    /// The largest document accepted, in bytes.
    #[serde(deserialize_with = "non_negative")]
    pub max_document_bytes: u64,
    /// The most pages of a PDF.
    #[serde(deserialize_with = "non_negative")]
    pub max_pdf_pages: u64,
    /// How long a node's claim on a document lasts without renewal, in seconds: a
    /// killed node's documents are taken up by another after this long.
    #[serde(deserialize_with = "non_negative")]
    pub lease_secs: u64,
    /// Chunks embedded and indexed per step.
    #[serde(deserialize_with = "non_negative")]
    pub embed_batch: u64,
    /// Documents this node ingests at once: while one embeds, the next is parsed,
    /// chunked and written.
    #[serde(deserialize_with = "non_negative")]
    pub workers: u64,
}

impl Default for KnowledgeConfig {
    fn default() -> Self {
        KnowledgeConfig {
            default_backend: "embedded".into(),
            default_embedding_model: String::new(),
            default_shards: 2,
            max_document_bytes: 64 * 1024 * 1024,
            max_pdf_pages: 2_000,
            lease_secs: 30,
            embed_batch: 64,
            workers: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Both empty: plain HTTP. Both set: HTTPS with this PEM certificate chain and key.
    pub cert_path: String,
    pub key_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The largest request body (JSON and the like), in bytes.
    #[serde(deserialize_with = "non_negative")]
    pub max_body_bytes: u64,
    /// The largest upload (models, documents, datasets), in bytes.
    #[serde(deserialize_with = "non_negative")]
    pub max_upload_bytes: u64,
    /// How long in-flight requests may run on after a stop signal, in seconds.
    #[serde(deserialize_with = "non_negative")]
    pub drain_timeout_secs: u64,
    /// Serve `/debug/*` diagnostic routes.
    pub debug_routes: bool,
    /// A chat session's actor stops after this many seconds without use; the next use
    /// loads it again from the database.
    #[serde(deserialize_with = "non_negative")]
    pub session_idle_secs: u64,
    /// Browser origins whose pages may call the API (`https://console.example.com`,
    /// with cookies), or `*` (any page, with API keys only).
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub allow_signup: bool,
    pub require_verification: bool,
    #[serde(deserialize_with = "non_negative")]
    pub session_ttl_secs: u64,
    #[serde(deserialize_with = "non_negative")]
    pub min_password_score: u8,
    /// Failed sign-ins to one account within `sign_in_window_secs` before further tries
    /// are refused until the window passes (an address gets four times as many).
    #[serde(deserialize_with = "non_negative")]
    pub max_sign_in_failures: u64,
    #[serde(deserialize_with = "non_negative")]
    pub sign_in_window_secs: u64,
    /// The address users reach the platform at (`https://maas.example.com`), for the
    /// redirect URIs registered with OAuth providers; empty uses each request's `Host`.
    pub public_url: String,
    /// Sign-in through OAuth 2.0 / OpenID Connect providers (`[[auth.oauth]]`).
    pub oauth: Vec<maas_gateway::auth::oauth::OAuthProvider>,
}

/// The mail server that sends messages to users; an empty host keeps them in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub host: String,
    #[serde(deserialize_with = "non_negative")]
    pub port: u16,
    /// `starttls` (required, port 587), `tls` (port 465) or `none` (a trusted relay only).
    pub security: maas_gateway::notify::SmtpSecurity,
    pub username: String,
    pub password: String,
    pub from: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: String::new(),
            port: 587,
            security: maas_gateway::notify::SmtpSecurity::Starttls,
            username: String::new(),
            password: String::new(),
            from: "maas <noreply@localhost>".into(),
        }
    }
}

/// The SMS provider's webhook; empty keeps text messages in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SmsConfig {
    pub webhook_url: String,
}

impl SmtpConfig {
    /// The notifier's SMTP settings, when a host is set.
    pub fn options(&self) -> Option<maas_gateway::notify::SmtpOptions> {
        (!self.host.is_empty()).then(|| maas_gateway::notify::SmtpOptions {
            host: self.host.clone(),
            port: self.port,
            security: self.security,
            username: self.username.clone(),
            password: self.password.clone(),
            from: self.from.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Applied to individual users who have no quota of their own.
    pub free_tier: QuotaLimits,
}

/// Limits per user, org or key; 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaLimits {
    #[serde(deserialize_with = "non_negative")]
    pub requests_per_minute: u64,
    #[serde(deserialize_with = "non_negative")]
    pub requests_per_day: u64,
    #[serde(deserialize_with = "non_negative")]
    pub tokens_per_day: u64,
    #[serde(deserialize_with = "non_negative")]
    pub tokens_per_month: u64,
    #[serde(deserialize_with = "non_negative")]
    pub storage_bytes: u64,
    #[serde(deserialize_with = "non_negative")]
    pub concurrent_requests: u64,
    #[serde(deserialize_with = "non_negative")]
    pub gpu_hours_per_month: u64,
    /// GPU memory (MiB) a subject's private deployments may reserve in all.
    #[serde(deserialize_with = "non_negative")]
    pub deployment_gpu_mib: u64,
}

impl QuotaLimits {
    /// The limits as the quota counters take them.
    pub fn limits(&self) -> maas_store::quota::QuotaLimits {
        maas_store::quota::QuotaLimits {
            requests_per_minute: self.requests_per_minute,
            requests_per_day: self.requests_per_day,
            tokens_per_day: self.tokens_per_day,
            tokens_per_month: self.tokens_per_month,
            storage_bytes: self.storage_bytes,
            concurrent_requests: self.concurrent_requests,
            gpu_hours_per_month: self.gpu_hours_per_month,
            deployment_gpu_mib: self.deployment_gpu_mib,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The response cache of the inference API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseCacheConfig {
    /// Keep answers of deterministic requests (temperature 0 or a fixed seed) and serve
    /// them again without running the model.
    pub enabled: bool,
    /// Answers kept in this process when no Redis is configured.
    #[serde(deserialize_with = "non_negative")]
    pub max_entries: u64,
    /// How long a kept answer is served, in seconds.
    #[serde(deserialize_with = "non_negative")]
    pub ttl_secs: u64,
}

impl Default for ResponseCacheConfig {
    fn default() -> Self {
        ResponseCacheConfig { enabled: true, max_entries: 10_000, ttl_secs: 3600 }
    }
}

/// Platform-wide safety rules, applied to every tenant's requests and answers (tenants
/// add their own through `/v1/safety/rules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SafetyConfig {
    pub rules: Vec<maas_gateway::safety::PlatformRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: a level (`info`) or directives (`info,maas_gateway=debug`).
    pub level: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            name: "node-1".into(),
            data_dir: PathBuf::from("./maas-data"),
            labels: BTreeMap::new(),
            gpu_memory_reserve_mib: 1024,
            simulated_gpus: Vec::new(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig { api: ([127, 0, 0, 1], 8080).into(), cluster: ([127, 0, 0, 1], 7070).into() }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig { url: String::new(), max_connections: 16 }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 16 * 1024 * 1024,
            max_upload_bytes: 10 * 1024 * 1024 * 1024,
            drain_timeout_secs: 30,
            debug_routes: false,
            session_idle_secs: 600,
            cors_allowed_origins: Vec::new(),
        }
    }
}

impl Default for AuthConfig {
    /// The gateway's own defaults, so the two cannot drift apart.
    fn default() -> Self {
        let defaults = maas_gateway::state::AuthOptions::default();
        AuthConfig {
            allow_signup: defaults.allow_signup,
            require_verification: defaults.require_verification,
            session_ttl_secs: defaults.session_ttl_secs,
            min_password_score: defaults.min_password_score,
            max_sign_in_failures: defaults.max_sign_in_failures,
            sign_in_window_secs: defaults.sign_in_window_secs,
            public_url: defaults.public_url,
            oauth: defaults.oauth,
        }
    }
}

impl Default for QuotaLimits {
    fn default() -> Self {
        QuotaLimits {
            requests_per_minute: 60,
            requests_per_day: 1000,
            tokens_per_day: 200_000,
            tokens_per_month: 2_000_000,
            storage_bytes: 1024 * 1024 * 1024,
            concurrent_requests: 4,
            gpu_hours_per_month: 0,
            deployment_gpu_mib: 0,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

/// Where the configuration came from, for messages.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    File(&'a Path),
    Defaults,
}

impl fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Defaults => f.write_str("the built-in defaults"),
        }
    }
}

/// The cookie a fresh configuration has; fine for one node, and a cluster should set its own.
pub const DEFAULT_COOKIE: &str = "maas-dev-cookie";

/// The prefix of environment variables that override configuration keys:
/// `MAAS_GATEWAY__MAX_BODY_BYTES=1048576` sets `gateway.max_body_bytes`.
pub const ENV_PREFIX: &str = "MAAS_";
/// Sets `node.data_dir` (shorthand kept for `maas up`).
pub const DATA_DIR_ENV: &str = "MAAS_DATA";

impl Config {
    /// Reads `path`, applies environment overrides, parses and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Self::from_toml(&text, &Source::File(path), std::env::vars())
    }

    /// Parses TOML text with the given environment, then validates.
    pub fn from_toml(
        text: &str,
        source: &Source<'_>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError(format!("{source}: invalid TOML: {}", one_line(&e.to_string())))
        })?;
        let mut from_env = BTreeMap::new();
        for (name, value) in env {
            if let Some(path) = env_key_path(&name) {
                set_path(&mut table, &path, parse_env_value(&value))
                    .map_err(|why| ConfigError(format!("environment variable {name}: {why}")))?;
                from_env.insert(path.join("."), name);
            }
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| {
            let path = err.path().to_string();
            let message = one_line(&err.into_inner().to_string());
            let origin =
                from_env.get(&path).map_or_else(|| source.to_string(), |name| format!("environment variable {name}"));
            if path == "." {
                ConfigError(format!("{origin}: {message}"))
            } else {
                ConfigError(format!("{origin}: `{path}`: {message}"))
            }
        })?;
        config.validate().map_err(|ConfigError(why)| ConfigError(format!("{source}: {why}")))?;
        Ok(config)
    }

    /// Rules that span keys or need more than a type: names the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}`: {why}")));
        if self.node.id == 0 {
            return bad("node.id", "must be 1 or more (0 is reserved by raft)".into());
        }
        if !valid_name(&self.node.name) {
            return bad("node.name", format!("`{}` must be 1 to 63 letters, digits, `-` or `_`", self.node.name));
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return bad("node.data_dir", "must not be empty".into());
        }
        for (key, value) in &self.node.labels {
            if !valid_name(key) {
                return bad("node.labels", format!("label name `{key}` must be 1 to 63 letters, digits, `-` or `_`"));
            }
            if value.len() > 253 {
                return bad("node.labels", format!("label `{key}` is longer than 253 characters"));
            }
        }
        for (i, gpu) in self.node.simulated_gpus.iter().enumerate() {
            if gpu.model.trim().is_empty() {
                return bad(&format!("node.simulated_gpus[{i}].model"), "must name a GPU model, e.g. \"H100\"".into());
            }
            if gpu.memory_mib == 0 {
                return bad(&format!("node.simulated_gpus[{i}].memory_mib"), "must be more than 0".into());
            }
            if gpu.memory_mib <= self.node.gpu_memory_reserve_mib {
                return bad(
                    &format!("node.simulated_gpus[{i}].memory_mib"),
                    format!(
                        "{} MiB leaves nothing after node.gpu_memory_reserve_mib = {} MiB",
                        gpu.memory_mib, self.node.gpu_memory_reserve_mib
                    ),
                );
            }
            if !(1..=64).contains(&gpu.count) {
                return bad(
                    &format!("node.simulated_gpus[{i}].count"),
                    format!("{} must be between 1 and 64", gpu.count),
                );
            }
        }
        if self.listen.api == self.listen.cluster && self.listen.api.port() != 0 {
            return bad(
                "listen.cluster",
                format!("{} is also listen.api: use two different addresses", self.listen.cluster),
            );
        }
        self.validate_cluster()?;
        if !self.database.url.is_empty() && maas_store::Backend::from_url(&self.database.url).is_err() {
            return bad(
                "database.url",
                format!(
                    "`{}` is not sqlite:PATH or postgres://USER@HOST:PORT/DB (empty: SQLite in node.data_dir)",
                    maas_store::db::redact(&self.database.url)
                ),
            );
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be 1 or more".into());
        }
        check_url("redis.url", &self.redis.url, &["redis://", "rediss://", "unix://"])?;
        self.validate_inference()?;
        check_url("milvus.url", &self.milvus.url, &["http://", "https://"])?;
        self.validate_knowledge()?;
        if self.tls.cert_path.is_empty() != self.tls.key_path.is_empty() {
            return bad("tls", "set both tls.cert_path and tls.key_path, or neither".into());
        }
        if self.gateway.max_body_bytes < 1024 {
            return bad(
                "gateway.max_body_bytes",
                format!("{} is below the minimum of 1024 bytes", self.gateway.max_body_bytes),
            );
        }
        if self.gateway.max_upload_bytes < self.gateway.max_body_bytes {
            return bad("gateway.max_upload_bytes", "must be at least gateway.max_body_bytes".into());
        }
        if self.gateway.session_idle_secs == 0 {
            return bad("gateway.session_idle_secs", "must be 1 or more".into());
        }
        self.validate_accounts()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad(
                "log.level",
                format!(
                    "`{}` is not a level (error, warn, info, debug, trace) or a filter like `info,maas_gateway=debug`",
                    self.log.level
                ),
            );
        }
        Ok(())
    }

    /// The rules of accounts and what reaches users: `[auth]`, `[smtp]`, `[sms]`, CORS.
    fn validate_knowledge(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}`: {why}")));
        let knowledge = &self.knowledge;
        match knowledge.default_backend.as_str() {
            "embedded" => {}
            "milvus" if !self.milvus.url.is_empty() => {}
            "milvus" => return bad("knowledge.default_backend", "\"milvus\" needs milvus.url".into()),
            other => return bad("knowledge.default_backend", format!("`{other}` is not \"embedded\" or \"milvus\"")),
        }
        if !(1..=64).contains(&knowledge.default_shards) {
            return bad("knowledge.default_shards", "must be 1 to 64".into());
        }
        if knowledge.max_document_bytes == 0 {
            return bad("knowledge.max_document_bytes", "must be more than 0".into());
        }
        if knowledge.max_pdf_pages == 0 {
            return bad("knowledge.max_pdf_pages", "must be more than 0".into());
        }
        if !(5..=3600).contains(&knowledge.lease_secs) {
            return bad("knowledge.lease_secs", "must be 5 to 3600".into());
        }
        if !(1..=2048).contains(&knowledge.embed_batch) {
            return bad("knowledge.embed_batch", "must be 1 to 2048".into());
        }
        if !(1..=16).contains(&knowledge.workers) {
            return bad("knowledge.workers", "must be 1 to 16".into());
        }
        Ok(())
    }

    fn validate_accounts(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}`: {why}")));
        if !self.smtp.host.is_empty()
            && let Err(reason) = maas_gateway::notify::parse_sender(&self.smtp.from)
        {
            return bad("smtp.from", reason);
        }
        check_url("sms.webhook_url", &self.sms.webhook_url, &["http://", "https://"])?;
        for origin in &self.gateway.cors_allowed_origins {
            let scheme_host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            if origin != "*"
                && !scheme_host.is_some_and(|rest| !rest.is_empty() && !rest.trim_end_matches('/').contains('/'))
            {
                return bad(
                    "gateway.cors_allowed_origins",
                    format!("`{origin}` is not an origin: use \"https://host[:port]\" (no path) or \"*\""),
                );
            }
        }
        if self.auth.session_ttl_secs < 60 {
            return bad(
                "auth.session_ttl_secs",
                format!("{} is below the minimum of 60 seconds", self.auth.session_ttl_secs),
            );
        }
        if self.auth.min_password_score > 4 {
            return bad(
                "auth.min_password_score",
                format!("{} is not a zxcvbn score: use 0 to 4", self.auth.min_password_score),
            );
        }
        self.validate_oauth()
    }

    /// The `[[auth.oauth]]` sign-in providers and the public URL their redirects use.
    fn validate_oauth(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}`: {why}")));
        let public_url = &self.auth.public_url;
        if !(public_url.is_empty() || public_url.starts_with("http://") || public_url.starts_with("https://")) {
            return bad(
                "auth.public_url",
                format!("`{public_url}` is not an http(s) URL such as https://maas.example.com"),
            );
        }
        for (i, provider) in self.auth.oauth.iter().enumerate() {
            if let Err((field, why)) = provider.validate() {
                return bad(&format!("auth.oauth[{i}].{field}"), why);
            }
            if self.auth.oauth[..i].iter().any(|earlier| earlier.name == provider.name) {
                return bad(&format!("auth.oauth[{i}].name"), format!("provider `{}` is listed twice", provider.name));
            }
        }
        Ok(())
    }

    /// The `[cluster]` rules: raft timing and failure detection that fit each other.
    /// The inference API's safety rules and response cache.
    fn validate_inference(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}`: {why}")));
        for (i, rule) in self.safety.rules.iter().enumerate() {
            if let Err(why) = maas_gateway::safety::check_pattern(rule.kind, &rule.pattern) {
                return bad(&format!("safety.rules[{i}].pattern"), why);
            }
        }
        if self.response_cache.ttl_secs == 0 {
            return bad(
                "response_cache.ttl_secs",
                "must be 1 or more (turn the cache off with response_cache.enabled = false)".into(),
            );
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}`: {why}")));
        if self.cluster.cookie.len() < 8 || self.cluster.cookie.chars().any(char::is_whitespace) {
            return bad("cluster.cookie", "must be at least 8 characters without spaces".into());
        }
        for url in &self.cluster.join {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad("cluster.join", format!("`{url}` is not a member's API address: use http://HOST:PORT"));
            }
        }
        if !(10..=10_000).contains(&self.cluster.raft_tick_ms) {
            return bad("cluster.raft_tick_ms", format!("{} must be between 10 and 10000", self.cluster.raft_tick_ms));
        }
        if self.cluster.heartbeat_ticks == 0 {
            return bad("cluster.heartbeat_ticks", "must be 1 or more".into());
        }
        if self.cluster.election_ticks <= self.cluster.heartbeat_ticks {
            return bad(
                "cluster.election_ticks",
                format!(
                    "{} must be more than cluster.heartbeat_ticks ({}), or followers time out between heartbeats",
                    self.cluster.election_ticks, self.cluster.heartbeat_ticks
                ),
            );
        }
        let heartbeat_ms = self.cluster.heartbeat_ticks * self.cluster.raft_tick_ms;
        if self.cluster.suspect_after_ms < 2 * heartbeat_ms {
            return bad(
                "cluster.suspect_after_ms",
                format!(
                    "{} ms is less than two heartbeats ({heartbeat_ms} ms each): one late heartbeat would make a node suspect",
                    self.cluster.suspect_after_ms
                ),
            );
        }
        if self.cluster.dead_after_ms <= self.cluster.suspect_after_ms {
            return bad("cluster.dead_after_ms", "must be longer than cluster.suspect_after_ms".into());
        }
        if self.cluster.snapshot_interval_entries < 100 {
            return bad(
                "cluster.snapshot_interval_entries",
                format!("{} is below the minimum of 100", self.cluster.snapshot_interval_entries),
            );
        }
        Ok(())
    }

    /// The database url in effect: the configured one, or SQLite in the data directory.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            maas_store::db::sqlite_url_in(&self.node.data_dir)
        } else {
            self.database.url.clone()
        }
    }

    /// The effective configuration as TOML, with secrets hidden.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = maas_store::db::redact(&shown.database.url);
        shown.redis.url = maas_store::db::redact(&shown.redis.url);
        if !shown.smtp.password.is_empty() {
            shown.smtp.password = "***".into();
        }
        toml::to_string_pretty(&shown).expect("the configuration serialises")
    }
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_url(key: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    if url.is_empty() || schemes.iter().any(|scheme| url.starts_with(scheme) && url.len() > scheme.len()) {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "`{key}`: `{}` must start with {} (or be empty)",
            maas_store::db::redact(url),
            schemes.join(" or ")
        )))
    }
}

/// `MAAS_GATEWAY__MAX_BODY_BYTES` → `["gateway", "max_body_bytes"]`; `MAAS_DATA` →
/// `["node", "data_dir"]`; other variables are not configuration.
fn env_key_path(name: &str) -> Option<Vec<String>> {
    if name == DATA_DIR_ENV {
        return Some(vec!["node".into(), "data_dir".into()]);
    }
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if !rest.contains("__") {
        return None;
    }
    Some(rest.split("__").map(str::to_ascii_lowercase).collect())
}

/// An environment value as a TOML value: numbers, booleans, arrays and inline tables
/// parse as such; anything else is a string.
fn parse_env_value(raw: &str) -> toml::Value {
    let wrapped = format!("value = {raw}");
    match wrapped.parse::<toml::Table>() {
        Ok(mut table) => table.remove("value").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("names no key")?;
    let mut current = table;
    for part in parents {
        let entry = current.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Refuses negative numbers with a message that says so (serde's own names the type).
fn non_negative<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    let value = i64::deserialize(deserializer)?;
    if value < 0 {
        return Err(serde::de::Error::custom(format!("must not be negative, got {value}")));
    }
    T::try_from(value).map_err(|_| serde::de::Error::custom(format!("{value} is too large")))
}

fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!("`{text}` is not an address: use IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Config::from_toml(text, &Source::File(Path::new("c.toml")), env)
    }

    #[test]
    fn the_documented_file_holds_exactly_the_defaults() {
        let documented = parse(include_str!("../../cluster.toml"), &[]).expect("cluster.toml is valid");
        assert_eq!(documented, Config::default());
        assert_eq!(parse("", &[]).unwrap(), Config::default());
    }

    #[test]
    fn the_effective_config_prints_and_parses_back() {
        let config = parse(
            "[node]\nname = \"gpu-7\"\nlabels = { zone = \"a\" }\n[[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 81920\ncount = 2\n",
            &[],
        )
        .unwrap();
        assert_eq!(parse(&config.to_toml(), &[]).unwrap(), config);
        assert_eq!(
            config.node.simulated_gpus,
            vec![SimulatedGpu { model: "H100".into(), memory_mib: 81920, count: 2 }]
        );
    }

    #[test]
    fn bad_configs_are_refused_naming_the_key() {
        let table: &[(&str, &[&str])] = &[
            ("[node]\nnmae = \"x\"", &["c.toml", "`node.nmae`", "unknown field `nmae`", "`name`"]),
            ("[nodes]\nname = \"x\"", &["`nodes`", "unknown field"]),
            ("[listen]\napi = \"localhost\"", &["`listen.api`", "not an address", "IP:PORT"]),
            ("[listen]\napi = \"1.2.3.4:99999\"", &["`listen.api`", "not an address"]),
            ("[gateway]\nmax_body_bytes = -5", &["`gateway.max_body_bytes`", "must not be negative, got -5"]),
            ("[node]\ngpu_memory_reserve_mib = -1", &["`node.gpu_memory_reserve_mib`", "must not be negative"]),
            ("[gateway]\nmax_body_bytes = \"big\"", &["`gateway.max_body_bytes`", "invalid type"]),
            ("[log]\nformat = \"xml\"", &["`log.format`", "`text`", "`json`"]),
            ("[node]\nid = 0", &["`node.id`", "1 or more"]),
            ("[node]\nname = \"has space\"", &["`node.name`"]),
            ("[database]\nurl = \"mysql://u:pw@h/db\"", &["`database.url`", "postgres://", "u:***@"]),
            ("[redis]\nurl = \"127.0.0.1:6379\"", &["`redis.url`", "redis://"]),
            ("[milvus]\nurl = \"grpc://x\"", &["`milvus.url`", "http://"]),
            ("[tls]\ncert_path = \"c.pem\"", &["`tls`", "both"]),
            ("[listen]\napi = \"127.0.0.1:1\"\ncluster = \"127.0.0.1:1\"", &["`listen.cluster`"]),
            (
                "[[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 512",
                &["`node.simulated_gpus[0].memory_mib`", "gpu_memory_reserve_mib"],
            ),
            (
                "[[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 81920\ncount = 0",
                &["`node.simulated_gpus[0].count`"],
            ),
            (
                "[[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 81920\nvram = 1",
                &["node.simulated_gpus[0]", "unknown field `vram`"],
            ),
            ("[log]\nlevel = \"maas=loud\"", &["`log.level`"]),
            ("[auth]\nmin_password_score = 9", &["`auth.min_password_score`", "0 to 4"]),
            ("[auth]\npublic_url = \"maas.example.com\"", &["`auth.public_url`", "http(s) URL"]),
            ("[[auth.oauth]]\nname = \"Corp SSO\"\nclient_id = \"x\"", &["`auth.oauth[0].name`", "a-z, 0-9"]),
            ("[[auth.oauth]]\nname = \"corp\"\nissuer_url = \"https://sso\"", &["`auth.oauth[0].client_id`"]),
            ("[[auth.oauth]]\nname = \"corp\"\nclient_id = \"x\"", &["`auth.oauth[0].issuer_url`", "not a URL"]),
            (
                "[[auth.oauth]]\nname = \"gh\"\nkind = \"github\"\nclient_id = \"x\"\n\
                 [[auth.oauth]]\nname = \"gh\"\nkind = \"github\"\nclient_id = \"y\"",
                &["`auth.oauth[1].name`", "listed twice"],
            ),
            ("[[auth.oauth]]\nname = \"g\"\nkind = \"facebook\"", &["facebook"]),
            (
                "[gateway]\ncors_allowed_origins = [\"console.example.com\"]",
                &["`gateway.cors_allowed_origins`", "https://"],
            ),
            ("[smtp]\nhost = \"mail\"\nfrom = \"not an address\"", &["`smtp.from`", "sender"]),
            ("[smtp]\nsecurity = \"ssl\"", &["`smtp.security`", "starttls"]),
            ("[sms]\nwebhook_url = \"ftp://x\"", &["`sms.webhook_url`", "http://"]),
            ("[cluster]\nelection_ticks = 2\nheartbeat_ticks = 2", &["`cluster.election_ticks`"]),
            ("[cluster]\nraft_tick_ms = 1", &["`cluster.raft_tick_ms`"]),
            ("[cluster]\ncookie = \"short\"", &["`cluster.cookie`", "8 characters"]),
            ("[cluster]\njoin = [\"10.0.0.1:8080\"]", &["`cluster.join`", "http://"]),
            ("[cluster]\nsuspect_after_ms = 300", &["`cluster.suspect_after_ms`", "two heartbeats"]),
            ("[cluster]\ndead_after_ms = 1000", &["`cluster.dead_after_ms`"]),
            ("[cluster]\nraft_tick_ms = -100", &["`cluster.raft_tick_ms`", "negative"]),
            ("[node\nname = 1", &["c.toml", "invalid TOML"]),
        ];
        for (text, wanted) in table {
            let err = parse(text, &[]).expect_err(text).to_string();
            assert!(!err.contains('\n'), "one line: {err}");
            for part in *wanted {
                assert!(err.contains(part), "{text:?}: `{err}` should contain `{part}`");
            }
        }
    }

    #[test]
    fn environment_variables_override_keys() {
        let config = parse(
            "[listen]\napi = \"127.0.0.1:9000\"",
            &[
                ("MAAS_LISTEN__API", "0.0.0.0:8081"),
                ("MAAS_GATEWAY__DEBUG_ROUTES", "true"),
                ("MAAS_NODE__NAME", "from-env"),
                ("MAAS_DATA", "/srv/maas"),
                ("MAAS_NODE__SIMULATED_GPUS", "[{model = \"A100\", memory_mib = 40960}]"),
                ("MAAS_UNRELATED", "ignored: no double underscore"),
                ("PATH", "/usr/bin"),
            ],
        )
        .unwrap();
        assert_eq!(config.listen.api, "0.0.0.0:8081".parse().unwrap());
        assert!(config.gateway.debug_routes);
        assert_eq!(config.node.name, "from-env");
        assert_eq!(config.node.data_dir, PathBuf::from("/srv/maas"));
        assert_eq!(config.node.simulated_gpus[0].count, 1);

        let err = parse("", &[("MAAS_GATEWAY__MAX_BODY_BYTES", "-1")]).unwrap_err().to_string();
        assert!(err.contains("environment variable MAAS_GATEWAY__MAX_BODY_BYTES") && err.contains("negative"), "{err}");
        let err = parse("", &[("MAAS_GATEWAY__NO_SUCH_KEY", "1")]).unwrap_err().to_string();
        assert!(err.contains("MAAS_GATEWAY__NO_SUCH_KEY") && err.contains("unknown field"), "{err}");
    }

    #[test]
    fn the_database_defaults_to_sqlite_in_the_data_dir() {
        let config = parse("[node]\ndata_dir = \"/srv/maas\"", &[]).unwrap();
        assert_eq!(config.database_url(), "sqlite:///srv/maas/maas.db?mode=rwc");
        let config = parse("[database]\nurl = \"postgres://maas:secret@db:5432/maas\"", &[]).unwrap();
        assert!(config.to_toml().contains("postgres://maas:***@db:5432/maas"), "secrets are hidden");
    }
}
