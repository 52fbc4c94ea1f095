//! `maas bench auth`: what authentication and the quota check add to a request. In this
//! process: the gateway's state over a SQLite store, a user with a quota and an API key
//! with its own quota (so two subjects are checked), and the limiter in this process or
//! in Redis (`--redis`). Each sample is what the inference routes do before their work:
//! authenticate the bearer key (`maas_gateway::auth::authenticate`), then admit the
//! request against every quota (`Limiter::admit`), then release its concurrency slot.
//! Samples run from `--concurrency` tasks at once; the cache-miss path (the key and its
//! scope read from the database, as after a revocation or on a node's first request) is
//! measured apart.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use maas_gateway::auth::{Access, Presented, authenticate};

use crate::bench_gateway::percentile;
use maas_gateway::{AppState, GatewayOptions};
use maas_store::quota::{Limiter, QuotaLimits};
use maas_store::repo::keys::{KeyScope, NewKey};
use maas_store::repo::users::NewUser;
use maas_store::{Owner, TenantScope};

#[derive(Debug, clap::Args)]
pub struct AuthBench {
    /// Samples per concurrency.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Concurrent tasks, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Also measure with the limiter in this Redis (e.g. redis://127.0.0.1:6379).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

/// A store in `dir` with a user and an API key, each with a (generous) quota so every
/// request checks two subjects; the stores and the key's secret.
pub(crate) async fn tenant_with_key(dir: &std::path::Path) -> Result<(maas_gateway::state::Stores, String)> {
    let db = maas_store::Db::connect(&maas_store::DbOptions::new(maas_store::db::sqlite_url_in(dir))).await?;
    db.migrate().await?;
    let blobs = maas_store::BlobStore::open(dir.join("blobs")).await?;
    let user = db
        .users()
        .create(NewUser {
            email: Some("bench@example.com".into()),
            display_name: "bench".into(),
            active: true,
            ..NewUser::default()
        })
        .await?;
    let generous = QuotaLimits {
        requests_per_minute: 1 << 40,
        requests_per_day: 1 << 40,
        tokens_per_day: 1 << 40,
        tokens_per_month: 1 << 40,
        concurrent_requests: 1 << 20,
        ..QuotaLimits::default()
    };
    db.usage().set_quota(&Owner::User(user.id.clone()), Some(&generous)).await?;
    let scope = TenantScope::resolve(&db, &user.id, None).await?;
    let secret = maas_gateway::auth::secrets::new_api_key();
    db.api_keys()
        .create(
            &scope,
            NewKey {
                name: "bench".into(),
                prefix: maas_gateway::auth::secrets::visible_prefix(&secret),
                secret_sha256: maas_gateway::auth::secrets::sha256_hex(&secret),
                scopes: vec![KeyScope::Inference],
                quota: generous,
                ..NewKey::default()
            },
        )
        .await?;
    Ok((maas_gateway::state::Stores { db, blobs, data_dir: dir.to_owned() }, secret))
}

/// One request's authentication and admission; its duration.
async fn one(state: &AppState, presented: &Presented) -> Result<Duration> {
    let started = Instant::now();
    let caller = authenticate(state, presented, &reqwest::Method::POST, Access::Inference, "127.0.0.1")
        .await
        .map_err(|err| anyhow::anyhow!("authentication failed: {}", err.message))?;
    anyhow::ensure!(caller.quotas.len() == 2, "the key's and the user's quotas are both checked");
    let permit = state
        .limiter()
        .admit(&caller.quotas, maas_store::ids::now_ms())
        .await?
        .map_err(|exceeded| anyhow::anyhow!("{exceeded}"))?;
    drop(permit);
    Ok(started.elapsed())
}

async fn run(state: &Arc<AppState>, secret: &str, requests: usize, concurrency: usize) -> Result<Vec<Duration>> {
    let presented = Presented { bearer: Some(secret.to_owned()), ..Presented::default() };
    one(state, &presented).await?;
    let per_task = requests.div_ceil(concurrency);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let state = Arc::clone(state);
        let presented = presented.clone();
        tasks.spawn(async move {
            let mut samples = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                samples.push(one(&state, &presented).await?);
            }
            anyhow::Ok(samples)
        });
    }
    let mut all = Vec::with_capacity(requests);
    while let Some(joined) = tasks.join_next().await {
        all.extend(joined.context("a bench task panicked")??);
    }
    all.sort_unstable();
    Ok(all)
}

/// Cold authentications: the cache emptied before each, so the key, its creator and the
/// quotas are read from the database.
async fn cold(state: &Arc<AppState>, secret: &str, requests: usize) -> Result<Vec<Duration>> {
    let presented = Presented { bearer: Some(secret.to_owned()), ..Presented::default() };
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        state.auth_cache.clear();
        samples.push(one(state, &presented).await?);
    }
    samples.sort_unstable();
    Ok(samples)
}

pub async fn auth(args: &AuthBench) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let (stores, secret) = tenant_with_key(dir.path()).await?;
    let mut limiters = vec![("in-process", Limiter::in_process())];
    if let Some(url) = &args.redis {
        let prefix = format!("{}:", maas_store::ids::new_id("maas-bench"));
        limiters.push(("redis", Limiter::redis(url, &prefix).await?));
    }
    let mut out = String::new();
    writeln!(out, "| limiter | path | concurrency | samples | p50 | p99 | p99.9 |")?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for (name, limiter) in limiters {
        // Each limiter gets a state of its own (the backend is set once per state).
        let state = Arc::new(AppState::new("bench", GatewayOptions::default()));
        let _ = state.stores.set(stores.clone());
        let _ = state.limiter_backend.set(limiter);
        for &concurrency in &args.concurrency {
            let samples = run(&state, &secret, args.requests, concurrency.max(1)).await?;
            writeln!(
                out,
                "| {name} | cached key | {concurrency} | {} | {} | {} | {} |",
                samples.len(),
                micros(percentile(&samples, 0.5)),
                micros(percentile(&samples, 0.99)),
                micros(percentile(&samples, 0.999))
            )?;
        }
        let samples = cold(&state, &secret, (args.requests / 10).max(100)).await?;
        writeln!(
            out,
            "| {name} | key from the database | 1 | {} | {} | {} | {} |",
            samples.len(),
            micros(percentile(&samples, 0.5)),
            micros(percentile(&samples, 0.99)),
            micros(percentile(&samples, 0.999))
        )?;
    }
    Ok(out)
}
