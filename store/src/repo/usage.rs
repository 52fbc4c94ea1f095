//! Metering: usage records, the price table they are costed by, and the quotas set for
//! users and organisations. Money is in millionths of the currency unit (micros), so sums
//! are exact.

use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::quota::QuotaLimits;
use crate::tenant::{Owner, TenantScope, trusted_sql};

/// What a usage record meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageKind {
    Inference,
    Training,
    Storage,
}

impl UsageKind {
    fn as_str(self) -> &'static str {
        match self {
            UsageKind::Inference => "inference",
            UsageKind::Training => "training",
            UsageKind::Storage => "storage",
        }
    }
}

/// One metered event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUsage {
    pub owner: Owner,
    pub user_id: String,
    pub key_id: Option<String>,
    pub kind: UsageKind,
    pub model: String,
    /// `chat`, `completions`, `embeddings`, `batch`, `session`, `fine_tuning`, `storage`; the
    /// model work done for a knowledge base: `knowledge.ingest`, `knowledge.graph`,
    /// `knowledge.retrieve`, `knowledge.condense`.
    pub endpoint: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub gpu_seconds: u64,
    pub storage_bytes: u64,
    pub latency_ms: u64,
    /// The HTTP status the request ended with (499: the client went away).
    pub status: u16,
    pub at_ms: i64,
}

/// Usage summed over one day, model and key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub model: String,
    pub key_id: Option<String>,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub gpu_seconds: i64,
    pub cost_micros: i64,
}

/// Prices of one model (or `*`, the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_1k_micros: i64,
    pub output_per_1k_micros: i64,
    pub gpu_hour_micros: i64,
}

/// The cost of `usage` at `price`, rounded down to a micro (the same arithmetic as the
/// SQL that costs each record as it is written).
pub fn cost_micros(price: Price, prompt_tokens: i64, completion_tokens: i64, gpu_seconds: i64) -> i64 {
    (prompt_tokens * price.input_per_1k_micros + completion_tokens * price.output_per_1k_micros) / 1000
        + gpu_seconds * price.gpu_hour_micros / 3600
}

/// `YYYY-MM-DD` of a day number since the Unix epoch (Howard Hinnant's civil-from-days).
pub fn day_name(days_since_epoch: i64) -> String {
    let z = days_since_epoch + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

const DAY_MS: i64 = 86_400_000;

/// Day, model, key, requests, errors, prompt and completion tokens, GPU seconds, cost.
type SummaryRow = (i64, String, Option<String>, i64, i64, i64, i64, i64, i64);

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| StoreError::InvalidInput(format!("{what} {value} is too large")))
}

pub struct Usage<'a> {
    pub(crate) db: &'a Db,
}

impl Usage<'_> {
    /// Records one event, costed by the model's price (or the default `*` price) in the
    /// same statement.
    pub async fn record(&self, usage: &NewUsage) -> Result<()> {
        self.record_many(std::slice::from_ref(usage)).await
    }

    /// Records events in one transaction (one commit, one fsync, however many rows).
    pub async fn record_many(&self, records: &[NewUsage]) -> Result<()> {
        let mut tx = self.db.begin_write().await?;
        for usage in records {
            sqlx::query(
                "INSERT INTO usage_records (id, owner_kind, owner_id, user_id, key_id, kind, model, endpoint, \
                 prompt_tokens, completion_tokens, gpu_seconds, storage_bytes, latency_ms, status, cost_micros, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, COALESCE((SELECT \
                 ($9 * p.input_per_1k_micros + $10 * p.output_per_1k_micros) / 1000 + $11 * p.gpu_hour_micros / 3600 \
                 FROM prices p WHERE p.model IN ($7, '*') ORDER BY CASE WHEN p.model = '*' THEN 1 ELSE 0 END LIMIT 1), 0), $15)",
            )
            .bind(new_id("usage"))
            .bind(usage.owner.kind())
            .bind(usage.owner.id())
            .bind(&usage.user_id)
            .bind(&usage.key_id)
            .bind(usage.kind.as_str())
            .bind(&usage.model)
            .bind(&usage.endpoint)
            .bind(to_i64(usage.prompt_tokens, "prompt tokens")?)
            .bind(to_i64(usage.completion_tokens, "completion tokens")?)
            .bind(to_i64(usage.gpu_seconds, "gpu seconds")?)
            .bind(to_i64(usage.storage_bytes, "storage bytes")?)
            .bind(to_i64(usage.latency_ms, "latency")?)
            .bind(i64::from(usage.status))
            .bind(usage.at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The scope's acting owner's usage from `since_ms` to `until_ms`, by day, model and
    /// key, oldest day first.
    pub async fn summary(&self, scope: &TenantScope, since_ms: i64, until_ms: i64) -> Result<Vec<UsageRow>> {
        let owner = scope.acting_as();
        let sql = format!(
            "SELECT r.created_at_ms / {DAY_MS} AS day, r.model, r.key_id, COUNT(*), \
             CAST(SUM(CASE WHEN r.status >= 400 THEN 1 ELSE 0 END) AS BIGINT), CAST(SUM(r.prompt_tokens) AS BIGINT), \
             CAST(SUM(r.completion_tokens) AS BIGINT), CAST(SUM(r.gpu_seconds) AS BIGINT), \
             CAST(SUM(r.cost_micros) AS BIGINT) FROM usage_records r \
             WHERE r.owner_kind = $2 AND r.owner_id = $3 AND r.created_at_ms >= $4 AND r.created_at_ms < $5 \
             AND r.kind <> 'storage' AND {} \
             GROUP BY r.created_at_ms / {DAY_MS}, r.model, r.key_id ORDER BY 1, 2, 3",
            TenantScope::readable_sql("r", 1)
        );
        let rows: Vec<SummaryRow> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            .bind(since_ms)
            .bind(until_ms)
            .fetch_all(self.db.pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(day, model, key_id, requests, errors, prompt_tokens, completion_tokens, gpu_seconds, cost_micros)| {
                    UsageRow {
                        day: day_name(day),
                        model,
                        key_id,
                        requests,
                        errors,
                        prompt_tokens,
                        completion_tokens,
                        gpu_seconds,
                        cost_micros,
                    }
                },
            )
            .collect())
    }

    /// Records every owner's stored bytes now (one `storage` record each), for billing
    /// and trends; returns how many owners were sampled.
    pub async fn sample_storage(&self, at_ms: i64) -> Result<usize> {
        let owners: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT owner_kind, owner_id, CAST(SUM(size_bytes) AS BIGINT) FROM files GROUP BY owner_kind, owner_id",
        )
        .fetch_all(self.db.pool())
        .await?;
        let records: Vec<NewUsage> = owners
            .into_iter()
            .map(|(kind, id, bytes)| {
                let owner = Owner::from_columns(&kind, id)?;
                Ok(NewUsage {
                    user_id: if matches!(owner, Owner::User(_)) { owner.id().to_owned() } else { String::new() },
                    owner,
                    key_id: None,
                    kind: UsageKind::Storage,
                    model: String::new(),
                    endpoint: "storage".into(),
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    gpu_seconds: 0,
                    storage_bytes: u64::try_from(bytes).unwrap_or(0),
                    latency_ms: 0,
                    status: 200,
                    at_ms,
                })
            })
            .collect::<Result<_>>()?;
        self.record_many(&records).await?;
        Ok(records.len())
    }

    /// The scope's acting owner's largest sampled storage per day, oldest first.
    pub async fn storage_by_day(
        &self,
        scope: &TenantScope,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, i64)>> {
        let owner = scope.acting_as();
        let sql = format!(
            "SELECT r.created_at_ms / {DAY_MS}, CAST(MAX(r.storage_bytes) AS BIGINT) FROM usage_records r \
             WHERE r.owner_kind = $2 AND r.owner_id = $3 AND r.created_at_ms >= $4 AND r.created_at_ms < $5 \
             AND r.kind = 'storage' AND {} GROUP BY r.created_at_ms / {DAY_MS} ORDER BY 1",
            TenantScope::readable_sql("r", 1)
        );
        let rows: Vec<(i64, i64)> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            .bind(since_ms)
            .bind(until_ms)
            .fetch_all(self.db.pool())
            .await?;
        Ok(rows.into_iter().map(|(day, bytes)| (day_name(day), bytes)).collect())
    }

    /// Bytes the owner keeps (what the storage quota counts): files, documents in its
    /// knowledge bases and versions of its own models.
    pub async fn stored_bytes(&self, owner: &Owner) -> Result<u64> {
        // Every version of a document or a model is kept until deleted.
        let bytes: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(COALESCE((SELECT SUM(size_bytes) FROM files WHERE owner_kind = $1 AND owner_id = $2), 0) \
             + COALESCE((SELECT SUM(d.size_bytes) FROM kb_documents d JOIN knowledge_bases k ON k.id = d.kb_id \
             WHERE k.owner_kind = $1 AND k.owner_id = $2), 0) \
             + COALESCE((SELECT SUM(v.total_bytes) FROM model_versions v JOIN models m ON m.id = v.model_id \
             WHERE m.owner_kind = $1 AND m.owner_id = $2), 0) AS BIGINT)",
        )
        .bind(owner.kind())
        .bind(owner.id())
        .fetch_one(self.db.pool())
        .await?;
        Ok(u64::try_from(bytes.unwrap_or(0)).unwrap_or(0))
    }

    /// GPU seconds recorded since `since_ms` for a quota subject (`key:<id>`, `user:<id>`
    /// or `org:<id>`, as the quota checks name them): what the GPU-hours quota counts.
    pub async fn gpu_seconds_since(&self, subject: &str, since_ms: i64) -> Result<u64> {
        let (kind, id) = subject
            .split_once(':')
            .ok_or_else(|| StoreError::InvalidInput(format!("quota subject `{subject}` has no kind")))?;
        let filter = match kind {
            "key" => "key_id = $1",
            "user" => "owner_kind = 'user' AND owner_id = $1",
            "org" => "owner_kind = 'org' AND owner_id = $1",
            other => return Err(StoreError::InvalidInput(format!("unknown quota subject kind `{other}`"))),
        };
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(gpu_seconds), 0) AS BIGINT) FROM usage_records WHERE {filter} AND created_at_ms >= $2"
        );
        let seconds: i64 =
            sqlx::query_scalar(trusted_sql(sql)).bind(id).bind(since_ms).fetch_one(self.db.pool()).await?;
        Ok(u64::try_from(seconds).unwrap_or(0))
    }

    /// The price table, `*` first.
    pub async fn prices(&self) -> Result<Vec<(String, Price)>> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT model, input_per_1k_micros, output_per_1k_micros, gpu_hour_micros FROM prices \
             ORDER BY CASE WHEN model = '*' THEN 0 ELSE 1 END, model",
        )
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(model, input, output, gpu)| {
                (model, Price { input_per_1k_micros: input, output_per_1k_micros: output, gpu_hour_micros: gpu })
            })
            .collect())
    }

    /// Sets a model's prices (`*`: the default); applies to records written from now on.
    pub async fn set_price(&self, model: &str, price: Price) -> Result<()> {
        if model.is_empty() || model.len() > 200 {
            return Err(StoreError::InvalidInput("a price's model must be 1 to 200 characters, or *".into()));
        }
        if price.input_per_1k_micros < 0 || price.output_per_1k_micros < 0 || price.gpu_hour_micros < 0 {
            return Err(StoreError::InvalidInput("prices cannot be negative".into()));
        }
        sqlx::query(
            "INSERT INTO prices (model, input_per_1k_micros, output_per_1k_micros, gpu_hour_micros, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (model) DO UPDATE SET input_per_1k_micros = excluded.input_per_1k_micros, \
             output_per_1k_micros = excluded.output_per_1k_micros, gpu_hour_micros = excluded.gpu_hour_micros, \
             updated_at_ms = excluded.updated_at_ms",
        )
        .bind(model)
        .bind(price.input_per_1k_micros)
        .bind(price.output_per_1k_micros)
        .bind(price.gpu_hour_micros)
        .bind(now_ms())
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    pub async fn delete_price(&self, model: &str) -> Result<()> {
        let deleted = sqlx::query("DELETE FROM prices WHERE model = $1")
            .bind(model)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound { what: "price", id: model.to_owned() });
        }
        Ok(())
    }

    /// The quota set for a user or an organisation, if any.
    pub async fn quota(&self, owner: &Owner) -> Result<Option<QuotaLimits>> {
        let limits: Option<String> =
            sqlx::query_scalar("SELECT limits FROM quotas WHERE subject_kind = $1 AND subject_id = $2")
                .bind(owner.kind())
                .bind(owner.id())
                .fetch_optional(self.db.pool())
                .await?;
        limits
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|err| StoreError::InvalidInput(format!("stored quota of {}: {err}", owner.id())))
            })
            .transpose()
    }

    /// Sets (`Some`) or removes (`None`: back to the defaults) a subject's quota.
    pub async fn set_quota(&self, owner: &Owner, limits: Option<&QuotaLimits>) -> Result<()> {
        match limits {
            Some(limits) => {
                sqlx::query(
                    "INSERT INTO quotas (subject_kind, subject_id, limits, updated_at_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (subject_kind, subject_id) DO UPDATE SET limits = excluded.limits, \
                     updated_at_ms = excluded.updated_at_ms",
                )
                .bind(owner.kind())
                .bind(owner.id())
                .bind(serde_json::to_string(limits).unwrap_or_default())
                .bind(now_ms())
                .execute(self.db.pool())
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM quotas WHERE subject_kind = $1 AND subject_id = $2")
                    .bind(owner.kind())
                    .bind(owner.id())
                    .execute(self.db.pool())
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_named_by_the_civil_calendar() {
        for (day, name) in [(0, "1970-01-01"), (59, "1970-03-01"), (11_016, "2000-02-29"), (20_791, "2026-12-04")] {
            assert_eq!(day_name(day), name);
        }
    }

    #[test]
    fn costs_round_down_to_a_micro() {
        let price = Price { input_per_1k_micros: 500, output_per_1k_micros: 1500, gpu_hour_micros: 3_600_000 };
        assert_eq!(cost_micros(price, 1000, 1000, 0), 2000);
        assert_eq!(cost_micros(price, 1, 1, 0), 2);
        assert_eq!(cost_micros(price, 0, 0, 90), 90_000);
    }
}
