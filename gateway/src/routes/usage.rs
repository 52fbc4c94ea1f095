//! The caller's usage and quota: `GET /v1/usage` (by day, model and key, with totals and
//! cost), `GET /v1/usage.csv` (the same as CSV), `GET /v1/quota` (limits and what is used).

use std::fmt::Write as _;
use std::sync::Arc;

use maas_store::repo::usage::UsageRow;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::auth::{Access, Caller, caller};
use crate::error::ApiError;
use crate::state::AppState;

const DAY_MS: i64 = 86_400_000;

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    let summary = warp::path!("v1" / "usage")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::query::<UsageQuery>())
        .and_then(|s: Arc<AppState>, c: Caller, query: UsageQuery| async move {
            usage_summary(&s, &c, &query).await.map_err(warp::reject::custom)
        });
    let csv = warp::path!("v1" / "usage.csv")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Manage))
        .and(crate::json::query::<UsageQuery>())
        .and_then(|s: Arc<AppState>, c: Caller, query: UsageQuery| async move {
            usage_csv(&s, &c, &query).await.map_err(warp::reject::custom)
        });
    let quota = warp::path!("v1" / "quota")
        .and(warp::get())
        .and(with_state(state))
        .and(caller(state, Access::Inference))
        .and_then(
            |s: Arc<AppState>, c: Caller| async move { quota_status(&s, &c).await.map_err(warp::reject::custom) },
        );
    summary.or(csv).unify().or(quota).unify().boxed()
}

/// The period: `days` back from now (default 30, at most 366), or `since`/`until` in
/// Unix seconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    pub days: Option<u32>,
    pub since: Option<i64>,
    pub until: Option<i64>,
}

fn period(query: &UsageQuery) -> Result<(i64, i64), ApiError> {
    let now = maas_store::ids::now_ms();
    let until = query.until.map_or(now + 1, |s| s.saturating_mul(1000));
    let since = match (query.since, query.days) {
        (Some(since), _) => since.saturating_mul(1000),
        (None, Some(days)) if (1..=366).contains(&days) => (now / DAY_MS - i64::from(days) + 1) * DAY_MS,
        (None, Some(_)) => {
            return Err(ApiError::bad_request("invalid_days", "days must be 1 to 366").with_param("days"));
        }
        (None, None) => (now / DAY_MS - 29) * DAY_MS,
    };
    if since >= until {
        return Err(ApiError::bad_request("invalid_period", "since must be before until").with_param("since"));
    }
    Ok((since, until))
}

async fn rows(state: &AppState, caller: &Caller, query: &UsageQuery) -> Result<Vec<UsageRow>, ApiError> {
    let (since, until) = period(query)?;
    Ok(state.stores()?.db.usage().summary(&caller.scope, since, until).await?)
}

/// Usage by day, model and key, with totals by model and by day (the trend).
#[utoipa::path(get, path = "/v1/usage", tag = "usage",
    params(("days" = Option<u32>, Query, description = "days back from today (default 30)"), ("since" = Option<i64>, Query, description = "Unix seconds"), ("until" = Option<i64>, Query, description = "Unix seconds")),
    responses((status = 200, description = "the usage", body = UsageSummary), (status = 400, body = crate::error::ErrorBody)))]
pub async fn usage_summary(state: &AppState, caller: &Caller, query: &UsageQuery) -> Result<Response, ApiError> {
    let rows = rows(state, caller, query).await?;
    let (since, until) = period(query)?;
    let storage = state.stores()?.db.usage().storage_by_day(&caller.scope, since, until).await?;
    let mut by_model = std::collections::BTreeMap::<String, UsageSums>::new();
    let mut by_day = std::collections::BTreeMap::<String, UsageSums>::new();
    let mut total = UsageSums::default();
    for row in &rows {
        by_model.entry(row.model.clone()).or_default().add(row);
        by_day.entry(row.day.clone()).or_default().add(row);
        total.add(row);
    }
    let body = UsageSummary {
        owner: caller.scope.acting_as().clone(),
        by_model: by_model.into_iter().map(|(model, sums)| ModelUsage { model, sums }).collect(),
        by_day: by_day.into_iter().map(|(day, sums)| DayUsage { day, sums }).collect(),
        data: rows,
        total,
        storage_by_day: storage.into_iter().map(|(day, max_bytes)| DayStorage { day, max_bytes }).collect(),
    };
    Ok(warp::reply::json(&body).into_response())
}

/// Requests, tokens and cost summed.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct UsageSums {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Millionths of the currency unit.
    pub cost_micros: i64,
}

impl UsageSums {
    fn add(&mut self, row: &UsageRow) {
        self.requests += row.requests;
        self.prompt_tokens += row.prompt_tokens;
        self.completion_tokens += row.completion_tokens;
        self.cost_micros += row.cost_micros;
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    pub sums: UsageSums,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DayUsage {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    #[serde(flatten)]
    pub sums: UsageSums,
}

/// The most bytes stored on one day (sampled hourly).
#[derive(Debug, Serialize, ToSchema)]
pub struct DayStorage {
    pub day: String,
    pub max_bytes: i64,
}

/// Usage of the caller (or the organisation it acts for) over a period.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageSummary {
    pub owner: maas_store::Owner,
    /// By day, model and key.
    pub data: Vec<UsageRow>,
    pub by_model: Vec<ModelUsage>,
    /// The trend.
    pub by_day: Vec<DayUsage>,
    pub total: UsageSums,
    pub storage_by_day: Vec<DayStorage>,
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_owned() }
}

/// The same usage as CSV, one line per day, model and key.
#[utoipa::path(get, path = "/v1/usage.csv", tag = "usage",
    params(("days" = Option<u32>, Query, description = "days back from today (default 30)"), ("since" = Option<i64>, Query, description = "Unix seconds"), ("until" = Option<i64>, Query, description = "Unix seconds")),
    responses((status = 200, description = "CSV", content_type = "text/csv"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn usage_csv(state: &AppState, caller: &Caller, query: &UsageQuery) -> Result<Response, ApiError> {
    let rows = rows(state, caller, query).await?;
    let mut out = String::from("day,model,key_id,requests,errors,prompt_tokens,completion_tokens,gpu_seconds,cost\n");
    for row in rows {
        let cost = format!("{}.{:06}", row.cost_micros / 1_000_000, row.cost_micros % 1_000_000);
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{cost}",
            row.day,
            csv_field(&row.model),
            csv_field(row.key_id.as_deref().unwrap_or_default()),
            row.requests,
            row.errors,
            row.prompt_tokens,
            row.completion_tokens,
            row.gpu_seconds
        );
    }
    let reply = warp::reply::with_header(out, "content-type", "text/csv; charset=utf-8");
    Ok(warp::reply::with_header(reply, "content-disposition", "attachment; filename=\"usage.csv\"").into_response())
}

/// The quotas the caller's requests count against, and what each has used.
#[utoipa::path(get, path = "/v1/quota", tag = "usage",
    responses((status = 200, description = "limits and counters", body = QuotaStatus), (status = 401, body = crate::error::ErrorBody)))]
pub async fn quota_status(state: &AppState, caller: &Caller) -> Result<Response, ApiError> {
    let now = maas_store::ids::now_ms();
    let mut data = Vec::new();
    for check in &caller.quotas {
        let used = state.limiter().usage(&check.subject, now).await?;
        data.push(SubjectQuota { subject: check.subject.clone(), limits: check.limits, used });
    }
    let stored_bytes = state.stores()?.db.usage().stored_bytes(caller.scope.acting_as()).await?;
    Ok(warp::reply::json(&QuotaStatus { object: "list", data, stored_bytes }).into_response())
}

/// One quota a request counts against: whose, its limits (0: unlimited) and its counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubjectQuota {
    /// `key:<id>`, `user:<id>` or `org:<id>`.
    pub subject: String,
    pub limits: maas_store::quota::QuotaLimits,
    pub used: maas_store::quota::QuotaUsage,
}

/// The quotas the caller's requests count against, and the bytes its owner stores.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaStatus {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<SubjectQuota>,
    pub stored_bytes: u64,
}
