//! What routes share: the node's identity, its readiness checks and its metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use maas_consensus::RaftHandle;
use maas_consensus::state::ClusterState;
use metrics_exporter_prometheus::PrometheusHandle;

/// One readiness check's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Not ready yet; the text says what it is waiting for.
    Pending(String),
    Ready,
    Failed(String),
}

/// Named readiness checks; the node is ready when every check is [`Check::Ready`].
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Mutex<BTreeMap<&'static str, Check>>,
}

impl Readiness {
    pub fn set(&self, name: &'static str, check: Check) {
        self.checks.lock().expect("readiness lock").insert(name, check);
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, Check> {
        self.checks.lock().expect("readiness lock").clone()
    }

    pub fn is_ready(&self) -> bool {
        self.checks.lock().expect("readiness lock").values().all(|check| *check == Check::Ready)
    }
}

/// Reports each peer's connection state by node id.
pub type PeerHealth = std::sync::Arc<dyn Fn() -> std::collections::BTreeMap<u64, String> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The largest request body any route accepts; uploads have their own larger limit.
    pub max_body_bytes: u64,
    /// Whether `/debug/*` routes are served.
    pub debug_routes: bool,
    /// The platform's safety rules (`[safety] rules`), applied to every tenant.
    pub safety_rules: Vec<crate::safety::PlatformRule>,
    /// The response cache of deterministic requests.
    pub response_cache: crate::response_cache::ResponseCacheOptions,
    /// `gateway.max_upload_bytes`: the largest blob upload, and the most an uploaded model
    /// archive may unpack to.
    pub max_upload_bytes: u64,
    /// Sign-up, verification and sessions (`[auth]`).
    pub auth: AuthOptions,
    /// `[quota.free_tier]`: the limits of individual users without a quota of their own.
    pub free_tier: maas_store::quota::QuotaLimits,
    /// Where messages to users go (`[smtp]`, `[sms]`).
    pub notify: crate::notify::NotifyOptions,
}

/// How accounts behave (`[auth]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOptions {
    /// Whether anyone may sign up; the first account becomes the administrator either way.
    pub allow_signup: bool,
    /// Whether an account must confirm its email or phone before it can sign in.
    pub require_verification: bool,
    pub session_ttl_secs: u64,
    /// The weakest password accepted, as a zxcvbn score (0 to 4).
    pub min_password_score: u8,
    /// Failed sign-ins to one account within `sign_in_window_secs` before it is
    /// throttled.
    pub max_sign_in_failures: u64,
    pub sign_in_window_secs: u64,
    /// Session cookies carry `Secure` (the node speaks HTTPS).
    pub secure_cookies: bool,
    /// The address users reach the platform at (`https://maas.example.com`), for the
    /// redirect URIs registered with OAuth providers; empty uses the request's `Host`.
    pub public_url: String,
    /// Sign-in providers (`[[auth.oauth]]`).
    pub oauth: Vec<crate::auth::oauth::OAuthProvider>,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            allow_signup: true,
            require_verification: true,
            session_ttl_secs: 7 * 24 * 3600,
            min_password_score: 3,
            max_sign_in_failures: 5,
            sign_in_window_secs: 900,
            secure_cookies: false,
            public_url: String::new(),
            oauth: Vec::new(),
        }
    }
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            max_body_bytes: 16 * 1024 * 1024,
            debug_routes: false,
            safety_rules: Vec::new(),
            response_cache: crate::response_cache::ResponseCacheOptions::default(),
            max_upload_bytes: 10 * 1024 * 1024 * 1024,
            auth: AuthOptions::default(),
            free_tier: maas_store::quota::QuotaLimits::default(),
            notify: crate::notify::NotifyOptions::default(),
        }
    }
}

/// The node's tenant data and files.
#[derive(Clone)]
pub struct Stores {
    pub db: maas_store::Db,
    pub blobs: maas_store::BlobStore,
    /// `node.data_dir`: models are laid out under `models/`.
    pub data_dir: std::path::PathBuf,
}

pub struct AppState {
    pub node_name: String,
    /// The control plane, once started (routes answer 503 until then).
    pub cluster: OnceLock<RaftHandle<ClusterState>>,
    /// The cluster cookie: joining and removing members must present it.
    pub cluster_cookie: OnceLock<String>,
    /// The models this node's replicas serve.
    pub serving: OnceLock<maas_actors::node::ServingTable>,
    /// The deployments' logs on this node (set with the node agent).
    pub journal: OnceLock<maas_actors::node::Journal>,
    /// The knowledge-base shards open on this node (set with the node agent).
    pub kb_shards: OnceLock<maas_actors::node::KbShardTable>,
    /// Requests this node has in flight to each replica (what routing balances).
    pub in_flight: crate::routes::openai::InFlight,
    /// For requests to peers (replicas on other nodes). It bounds connecting and keeps TCP
    /// keepalive on (a peer whose machine vanished is noticed), but sets no overall or
    /// read timeout, since answers stream for as long as a generation runs: a stream of a
    /// remote generation is bounded by its heartbeats instead (see `routes::openai`).
    pub http: reqwest::Client,
    /// The database and blob store, once open.
    pub stores: OnceLock<Stores>,
    /// Memory kept free on every GPU (`node.gpu_memory_reserve_mib`), for the scheduler's
    /// view of the cluster.
    pub gpu_reserve_mib: OnceLock<u64>,
    /// The transport's view of each peer's connection (`connected`, `cookie_mismatch`, ...).
    pub peer_health: OnceLock<PeerHealth>,
    /// What this node's agent runs (its GPU actors and their leases).
    pub agent: OnceLock<Arc<std::sync::RwLock<maas_actors::node::AgentStatus>>>,
    /// Delivers messages to users (verification and reset codes).
    pub notifier: Arc<crate::notify::Notifier>,
    /// Usage records on their way to the database, in batches.
    pub usage_writer: crate::metering::UsageWriter,
    /// Recent authentications (see [`crate::auth`]).
    pub auth_cache: crate::auth::AuthCache,
    /// The OAuth / OpenID Connect sign-in providers and what they published.
    pub oauth: crate::auth::oauth::Providers,
    /// Quota and rate-limit counters: Redis when configured, else this process.
    /// Set once at start-up (Redis when configured); [`AppState::limiter`] reads it.
    pub limiter_backend: OnceLock<maas_store::quota::Limiter>,
    /// The load other nodes report for their replicas.
    pub replica_loads: crate::load::ReplicaLoads,
    /// Callers' compiled safety rules.
    pub safety: crate::safety::PolicyCache,
    /// Answers of deterministic requests.
    pub response_cache: crate::response_cache::ResponseCache,
    /// The chat sessions' actors on this node.
    pub sessions: OnceLock<maas_actors::session::Sessions>,
    /// This node's share of the deployments' monitoring figures.
    pub monitor: crate::monitor::Monitor,
    /// Deployed models' tokenizers, templates and contexts, read from their replicas.
    pub model_texts: crate::model_text::ModelTexts,
    /// Knowledge-base storage and ingestion, once the node opened it.
    pub knowledge: OnceLock<Arc<crate::knowledge::KnowledgeService>>,
    pub started: Instant,
    pub readiness: Readiness,
    pub metrics: PrometheusHandle,
    pub options: GatewayOptions,
}

impl AppState {
    pub fn new(node_name: impl Into<String>, options: GatewayOptions) -> Self {
        AppState {
            node_name: node_name.into(),
            cluster: OnceLock::new(),
            cluster_cookie: OnceLock::new(),
            stores: OnceLock::new(),
            serving: OnceLock::new(),
            journal: OnceLock::new(),
            kb_shards: OnceLock::new(),
            in_flight: crate::routes::openai::InFlight::default(),
            model_texts: crate::model_text::ModelTexts::default(),
            monitor: crate::monitor::Monitor::default(),
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(3))
                .tcp_keepalive(std::time::Duration::from_secs(15))
                .build()
                .unwrap_or_default(),
            gpu_reserve_mib: OnceLock::new(),
            peer_health: OnceLock::new(),
            agent: OnceLock::new(),
            notifier: Arc::new(crate::notify::Notifier::new(&options.notify)),
            usage_writer: crate::metering::UsageWriter::default(),
            auth_cache: crate::auth::AuthCache::default(),
            oauth: crate::auth::oauth::Providers::new(options.auth.oauth.clone()),
            limiter_backend: OnceLock::new(),
            replica_loads: crate::load::ReplicaLoads::default(),
            safety: crate::safety::PolicyCache::new(options.safety_rules.clone()),
            response_cache: crate::response_cache::ResponseCache::new(options.response_cache.clone()),
            sessions: OnceLock::new(),
            knowledge: OnceLock::new(),
            started: Instant::now(),
            readiness: Readiness::default(),
            metrics: crate::metrics::prometheus(),
            options,
        }
    }
}

impl AppState {
    /// The quota and rate-limit counters: the configured backend, or this process's.
    pub fn limiter(&self) -> &maas_store::quota::Limiter {
        self.limiter_backend.get_or_init(maas_store::quota::Limiter::in_process)
    }

    /// The database and blob store, or a 503 while they open.
    pub fn stores(&self) -> Result<&Stores, crate::ApiError> {
        self.stores.get().ok_or_else(|| crate::ApiError::unavailable("the store is starting; retry shortly"))
    }
}
