//! Files a tenant uploaded. The rows are tenant-owned: every query takes a
//! [`TenantScope`]. The bytes are in the blob store under `sha256`.

use serde::Serialize;

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::tenant::{Owner, TenantScope, trusted_sql};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileRecord {
    pub id: String,
    pub owner: Owner,
    pub filename: String,
    pub purpose: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NewFile {
    pub filename: String,
    pub purpose: String,
    pub size_bytes: u64,
    pub sha256: String,
}

type FileRow = (String, String, String, String, String, i64, String, i64);

const FILE_COLUMNS: &str =
    "f.id, f.owner_kind, f.owner_id, f.filename, f.purpose, f.size_bytes, f.sha256, f.created_at_ms";

fn file_from_row(row: FileRow) -> Result<FileRecord> {
    let (id, owner_kind, owner_id, filename, purpose, size_bytes, sha256, created_at_ms) = row;
    Ok(FileRecord {
        id,
        owner: Owner::from_columns(&owner_kind, owner_id)?,
        filename,
        purpose,
        size_bytes,
        sha256,
        created_at_ms,
    })
}

pub struct Files<'a> {
    pub(crate) db: &'a Db,
}

impl Files<'_> {
    /// Records a file owned by the scope's acting owner.
    pub async fn create(&self, scope: &TenantScope, new: NewFile) -> Result<FileRecord> {
        if new.filename.is_empty() || new.filename.len() > 255 {
            return Err(StoreError::InvalidInput("a file name must be 1 to 255 bytes long".into()));
        }
        let size_bytes = i64::try_from(new.size_bytes)
            .map_err(|_| StoreError::InvalidInput(format!("file size {} is too large", new.size_bytes)))?;
        let record = FileRecord {
            id: new_id("file"),
            owner: scope.acting_as().clone(),
            filename: new.filename,
            purpose: new.purpose,
            size_bytes,
            sha256: new.sha256,
            created_at_ms: now_ms(),
        };
        sqlx::query(
            "INSERT INTO files (id, owner_kind, owner_id, filename, purpose, size_bytes, sha256, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&record.id)
        .bind(record.owner.kind())
        .bind(record.owner.id())
        .bind(&record.filename)
        .bind(&record.purpose)
        .bind(record.size_bytes)
        .bind(&record.sha256)
        .bind(record.created_at_ms)
        .execute(self.db.pool())
        .await?;
        Ok(record)
    }

    /// A file the scope may read; another tenant's file is reported as not found, so ids
    /// do not leak across tenants.
    pub async fn get(&self, scope: &TenantScope, id: &str) -> Result<FileRecord> {
        let sql =
            format!("SELECT {FILE_COLUMNS} FROM files f WHERE f.id = $2 AND {}", TenantScope::readable_sql("f", 1));
        let row: Option<FileRow> =
            sqlx::query_as(trusted_sql(sql)).bind(scope.user_id()).bind(id).fetch_optional(self.db.pool()).await?;
        row.map(file_from_row).transpose()?.ok_or_else(|| StoreError::NotFound { what: "file", id: id.to_owned() })
    }

    /// The files of the scope's acting owner, newest first.
    pub async fn list(&self, scope: &TenantScope) -> Result<Vec<FileRecord>> {
        let owner = scope.acting_as();
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files f WHERE f.owner_kind = $2 AND f.owner_id = $3 AND {} \
             ORDER BY f.created_at_ms DESC, f.id DESC",
            TenantScope::readable_sql("f", 1)
        );
        let rows: Vec<FileRow> = sqlx::query_as(trusted_sql(sql))
            .bind(scope.user_id())
            .bind(owner.kind())
            .bind(owner.id())
            .fetch_all(self.db.pool())
            .await?;
        rows.into_iter().map(file_from_row).collect()
    }

    /// Deletes a file the scope may change. Returns the deleted record.
    pub async fn delete(&self, scope: &TenantScope, id: &str) -> Result<FileRecord> {
        let record = self.get(scope, id).await?;
        let sql = format!("DELETE FROM files WHERE id = $2 AND {}", TenantScope::writable_sql("files", 1));
        let deleted =
            sqlx::query(trusted_sql(sql)).bind(scope.user_id()).bind(id).execute(self.db.pool()).await?.rows_affected();
        if deleted == 0 {
            return Err(StoreError::Forbidden(format!(
                "only the owner, or an owner or admin of its organisation, may delete file `{id}`"
            )));
        }
        Ok(record)
    }
}
