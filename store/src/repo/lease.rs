//! Leases on rows of background work (batches, fine-tuning jobs): `lease_owner` names the
//! node working on a row and `lease_expires_at_ms` until when. A node that dies stops
//! renewing, and its lease passes to whichever node claims the row after it expired (or to
//! the same node restarted, which takes its own rows back at once).

use crate::db::Db;
use crate::error::Result;
use crate::tenant::trusted_sql;

/// The leased rows of one table: those whose `status` is in `active` (an SQL list).
pub(crate) struct Leases {
    pub table: &'static str,
    pub active: &'static str,
}

impl Leases {
    /// Claims one active row for `worker` until `lease_until_ms`, oldest first: a row with
    /// no lease, an expired one, or one `worker` holds. The claim is a compare-and-set on
    /// the lease, so two nodes never hold the same row. Returns the row's id.
    pub(crate) async fn claim(
        &self,
        db: &Db,
        worker: &str,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Option<String>> {
        let Leases { table, active } = self;
        let free = "(lease_owner IS NULL OR lease_owner = $1 OR lease_expires_at_ms < $2)";
        let sql =
            format!("SELECT id FROM {table} WHERE status IN {active} AND {free} ORDER BY created_at_ms, id LIMIT 8");
        let candidates: Vec<String> =
            sqlx::query_scalar(trusted_sql(sql)).bind(worker).bind(now_ms).fetch_all(db.pool()).await?;
        for id in candidates {
            let sql = format!(
                "UPDATE {table} SET lease_owner = $1, lease_expires_at_ms = $3 WHERE id = $4 AND status IN {active} AND {free}"
            );
            let claimed = sqlx::query(trusted_sql(sql))
                .bind(worker)
                .bind(now_ms)
                .bind(lease_until_ms)
                .bind(&id)
                .execute(db.pool())
                .await?
                .rows_affected();
            if claimed == 1 {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Extends `worker`'s lease on an active row; false when the worker no longer holds it
    /// (it expired and another node took the row) or the row ended, so the worker stops.
    pub(crate) async fn renew(&self, db: &Db, id: &str, worker: &str, lease_until_ms: i64) -> Result<bool> {
        let Leases { table, active } = self;
        let sql = format!(
            "UPDATE {table} SET lease_expires_at_ms = $1 WHERE id = $2 AND lease_owner = $3 AND status IN {active}"
        );
        let renewed =
            sqlx::query(trusted_sql(sql)).bind(lease_until_ms).bind(id).bind(worker).execute(db.pool()).await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Gives a lease up (the worker is done with the row for now).
    pub(crate) async fn release(&self, db: &Db, id: &str, worker: &str) -> Result<()> {
        let table = self.table;
        let sql = format!(
            "UPDATE {table} SET lease_owner = NULL, lease_expires_at_ms = NULL WHERE id = $1 AND lease_owner = $2"
        );
        sqlx::query(trusted_sql(sql)).bind(id).bind(worker).execute(db.pool()).await?;
        Ok(())
    }
}
