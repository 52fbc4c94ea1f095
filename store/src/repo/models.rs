//! The model repository: named models and their immutable versions, each a list of files
//! whose bytes are blobs in the blob store. A model belongs to the platform (imported by
//! operators, visible to every tenant), a user or an organisation (visible to the user, or
//! to the organisation's members: read through a [`TenantScope`], TEN-1). Names are unique
//! per owner: a tenant's `tiny` and the platform's `tiny` are two models.

use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{Result, StoreError};
use crate::ids::{new_id, now_ms};
use crate::tenant::{Owner, TenantScope, trusted_sql};

/// One file of a model version, relative to the model's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub path: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// What a version's files say about the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    /// `safetensors` or `gguf`.
    pub format: String,
    pub architecture: String,
    /// 0 when unknown.
    pub parameters: u64,
    /// 0 when unknown.
    pub context_length: u64,
    /// `float32`, `bfloat16`, ... (`mixed` or empty when unknown).
    pub dtype: String,
    /// `none`, or the GGUF quantisation (`Q4_K_M`, ...).
    pub quantization: String,
    /// `chat`, `completion`, `embedding`.
    pub tasks: Vec<String>,
    /// The model's own description: `config.json`, or a GGUF file's scalar metadata.
    pub config: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct NewModelVersion {
    pub name: String,
    /// `None`: the next `vN`.
    pub version: Option<String>,
    pub description: String,
    pub metadata: ModelMetadata,
    pub files: Vec<ModelFile>,
}

/// A model version as the repository shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ModelVersionRecord {
    pub id: String,
    pub model_id: String,
    pub name: String,
    /// `platform`, `user` or `org`.
    pub owner_kind: String,
    pub owner_id: String,
    pub description: String,
    pub version: String,
    #[serde(flatten)]
    pub metadata: ModelMetadata,
    pub files: Vec<ModelFile>,
    pub total_bytes: u64,
    pub created_at_ms: i64,
}

/// The version name meaning "the newest version".
pub const LATEST: &str = "latest";

/// Whether `name` may name a model: 1 to 128 ASCII letters, digits, `.`, `-`, `_` and
/// `/` (as Hugging Face names are), not starting with `/` or `.`.
pub fn model_name_is_valid(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
        && !name.starts_with(['/', '.'])
        && !name.contains("//")
        && !name.contains("..")
}

/// Whether `version` may name a version: 1 to 64 ASCII letters, digits, `.`, `-`, `_`,
/// and not `latest`.
pub fn version_is_valid(version: &str) -> bool {
    (1..=64).contains(&version.len())
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && version != LATEST
}

/// Whether a file path inside a model is safe to materialise: relative, no `..`, no
/// backslashes, at most 255 bytes.
pub fn model_file_path_is_valid(path: &str) -> bool {
    (1..=255).contains(&path.len())
        && !path.starts_with('/')
        && !path.contains('\\')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    id: String,
    model_id: String,
    name: String,
    owner_kind: String,
    owner_id: String,
    description: String,
    version: String,
    format: String,
    architecture: String,
    parameters: i64,
    context_length: i64,
    dtype: String,
    quantization: String,
    tasks: String,
    config: String,
    files: String,
    total_bytes: i64,
    created_at_ms: i64,
}

const VERSION_COLUMNS: &str = "v.id, v.model_id, m.name, m.owner_kind, m.owner_id, m.description, v.version, v.format, \
     v.architecture, v.parameters, v.context_length, v.dtype, v.quantization, v.tasks, v.config, v.files, v.total_bytes, v.created_at_ms";

fn version_from_row(row: VersionRow) -> Result<ModelVersionRecord> {
    let VersionRow {
        id,
        model_id,
        name,
        owner_kind,
        owner_id,
        description,
        version,
        format,
        architecture,
        parameters,
        context_length,
        dtype,
        quantization,
        tasks,
        config,
        files,
        total_bytes,
        created_at_ms,
    } = row;
    let corrupt = |what: &str, err: serde_json::Error| {
        StoreError::InvalidInput(format!("model version `{id}` has unreadable {what} in the database: {err}"))
    };
    Ok(ModelVersionRecord {
        metadata: ModelMetadata {
            format,
            architecture,
            parameters: u64::try_from(parameters).unwrap_or(0),
            context_length: u64::try_from(context_length).unwrap_or(0),
            dtype,
            quantization,
            tasks: serde_json::from_str(&tasks).map_err(|e| corrupt("tasks", e))?,
            config: serde_json::from_str(&config).map_err(|e| corrupt("config", e))?,
        },
        files: serde_json::from_str(&files).map_err(|e| corrupt("files", e))?,
        total_bytes: u64::try_from(total_bytes).unwrap_or(0),
        id,
        model_id,
        name,
        owner_kind,
        owner_id,
        description,
        version,
        created_at_ms,
    })
}

/// Checks a new version's model name and version name (before its files are known, so a
/// bad name fails before an archive is unpacked).
pub fn validate_names(name: &str, version: Option<&str>) -> Result<()> {
    if !model_name_is_valid(name) {
        return Err(StoreError::InvalidInput(format!(
            "model name `{name}` must be 1 to 128 letters, digits, `.`, `-`, `_` or `/`"
        )));
    }
    if let Some(version) = version
        && !version_is_valid(version)
    {
        return Err(StoreError::InvalidInput(format!(
            "version `{version}` must be 1 to 64 letters, digits, `.`, `-` or `_`, and not `latest`"
        )));
    }
    Ok(())
}

/// Checks a new version's name, version and files; returns its total size.
pub fn validate(new: &NewModelVersion) -> Result<u64> {
    validate_names(&new.name, new.version.as_deref())?;
    if new.files.is_empty() {
        return Err(StoreError::InvalidInput("a model version needs at least one file".into()));
    }
    let mut paths = std::collections::BTreeSet::new();
    for file in &new.files {
        if !model_file_path_is_valid(&file.path) {
            return Err(StoreError::InvalidInput(format!("file path `{}` must be relative, without `..`", file.path)));
        }
        if !paths.insert(file.path.as_str()) {
            return Err(StoreError::InvalidInput(format!("file `{}` is listed twice", file.path)));
        }
        if file.sha256.len() != 64 || !file.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return Err(StoreError::InvalidInput(format!("file `{}` has no valid sha256", file.path)));
        }
    }
    Ok(new.files.iter().map(|f| f.size_bytes).fold(0, u64::saturating_add))
}

pub struct Models<'a> {
    pub(crate) db: &'a Db,
}

impl Models<'_> {
    /// Registers a version of a platform model (creating the model on its first version).
    /// Versions are immutable: registering an existing one is a conflict.
    pub async fn register_platform(&self, new: NewModelVersion) -> Result<ModelVersionRecord> {
        self.register(None, new).await
    }

    /// Registers a version of a model owned by the scope's acting owner (the user, or an
    /// organisation of which the user is an owner or admin).
    pub async fn register_in(&self, scope: &TenantScope, new: NewModelVersion) -> Result<ModelVersionRecord> {
        scope.require_org_manager(self.db, "add models to its repository").await?;
        self.register(Some(scope.acting_as()), new).await
    }

    /// Registers a version of a model of `owner` (`None`: the platform).
    async fn register(&self, owner: Option<&Owner>, new: NewModelVersion) -> Result<ModelVersionRecord> {
        let (owner_kind, owner_id) = owner_columns(owner);
        let total_bytes = validate(&new)?;
        let to_i64 = |value: u64, what: &str| {
            i64::try_from(value).map_err(|_| StoreError::InvalidInput(format!("{what} {value} is too large")))
        };
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let existing: Option<(String, String)> =
            sqlx::query_as("SELECT id, description FROM models WHERE owner_kind = $1 AND owner_id = $2 AND name = $3")
                .bind(owner_kind)
                .bind(owner_id)
                .bind(&new.name)
                .fetch_optional(&mut *tx)
                .await?;
        let (model_id, description) = if let Some(found) = existing {
            found
        } else {
            let id = new_id("model");
            sqlx::query(
                "INSERT INTO models (id, owner_kind, owner_id, name, description, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&id)
            .bind(owner_kind)
            .bind(owner_id)
            .bind(&new.name)
            .bind(&new.description)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|err| {
                StoreError::conflict_on_unique(err, || format!("model `{}` was created meanwhile; retry", new.name))
            })?;
            (id, new.description.clone())
        };
        let version = if let Some(version) = new.version {
            version
        } else {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM model_versions WHERE model_id = $1")
                .bind(&model_id)
                .fetch_one(&mut *tx)
                .await?;
            format!("v{}", count + 1)
        };
        let id = new_id("mv");
        sqlx::query(
            "INSERT INTO model_versions (id, model_id, version, format, architecture, parameters, context_length, dtype, \
             quantization, tasks, config, files, total_bytes, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&id)
        .bind(&model_id)
        .bind(&version)
        .bind(&new.metadata.format)
        .bind(&new.metadata.architecture)
        .bind(to_i64(new.metadata.parameters, "parameter count")?)
        .bind(to_i64(new.metadata.context_length, "context length")?)
        .bind(&new.metadata.dtype)
        .bind(&new.metadata.quantization)
        .bind(serde_json::to_string(&new.metadata.tasks).expect("strings serialise"))
        .bind(new.metadata.config.to_string())
        .bind(serde_json::to_string(&new.files).expect("files serialise"))
        .bind(to_i64(total_bytes, "total size")?)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|err| {
            StoreError::conflict_on_unique(err, || {
                format!("model `{}` already has version `{version}`: versions are immutable, choose another", new.name)
            })
        })?;
        tx.commit().await?;
        Ok(ModelVersionRecord {
            id,
            model_id,
            name: new.name,
            owner_kind: owner_kind.to_owned(),
            owner_id: owner_id.to_owned(),
            description,
            version,
            metadata: new.metadata,
            files: new.files,
            total_bytes,
            created_at_ms: now,
        })
    }

    /// Every version of every platform model, by name then newest first.
    pub async fn list_platform(&self) -> Result<Vec<ModelVersionRecord>> {
        self.list_where("m.owner_kind = 'platform'", None).await
    }

    /// One version of a platform model; [`LATEST`] is the newest.
    pub async fn find_platform(&self, name: &str, version: &str) -> Result<ModelVersionRecord> {
        self.find(None, name, version).await
    }

    /// One version of a model of `owner` (`None`: the platform's); [`LATEST`] is the
    /// newest. For nodes loading a deployment's model, whose owner the deployment names.
    pub async fn find(&self, owner: Option<&Owner>, name: &str, version: &str) -> Result<ModelVersionRecord> {
        let (owner_kind, owner_id) = owner_columns(owner);
        let base = format!(
            "SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id \
             WHERE m.owner_kind = $1 AND m.owner_id = $2 AND m.name = $3"
        );
        let row: Option<VersionRow> = if version == LATEST {
            let sql = format!("{base} ORDER BY v.created_at_ms DESC, v.id DESC LIMIT 1");
            sqlx::query_as(trusted_sql(sql))
                .bind(owner_kind)
                .bind(owner_id)
                .bind(name)
                .fetch_optional(self.db.pool())
                .await?
        } else {
            let sql = format!("{base} AND v.version = $4");
            sqlx::query_as(trusted_sql(sql))
                .bind(owner_kind)
                .bind(owner_id)
                .bind(name)
                .bind(version)
                .fetch_optional(self.db.pool())
                .await?
        };
        row.map(version_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound { what: "model version", id: format!("{name}:{version}") })
    }

    /// A version of `owner`'s model `name` when it has one, else of the platform's; another
    /// tenant's models are not found (TEN-1). For deploying: a tenant's own model comes
    /// first. `owner` is a scope's acting owner, or the owner of a deployment made in one.
    pub async fn find_for(&self, owner: Option<&Owner>, name: &str, version: &str) -> Result<ModelVersionRecord> {
        if owner.is_some() {
            match self.find(owner, name, version).await {
                Err(StoreError::NotFound { .. }) => {}
                found => return found,
            }
        }
        self.find(None, name, version).await
    }

    /// The platform's models and those the scope's user may read (their own and their
    /// organisations'), by name, then owner, then newest first.
    pub async fn list_visible(&self, scope: &TenantScope) -> Result<Vec<ModelVersionRecord>> {
        let filter = format!("m.owner_kind = 'platform' OR {}", TenantScope::readable_sql("m", 1));
        self.list_where(&filter, Some(scope.user_id())).await
    }

    /// Every version of every model, whoever owns it (for platform administrators).
    pub async fn list_all(&self) -> Result<Vec<ModelVersionRecord>> {
        self.list_where("TRUE", None).await
    }

    /// The versions of the models `filter` (constant SQL over `m`, with `$1` the user when
    /// given) admits, by name, then owner, then newest first.
    async fn list_where(&self, filter: &str, user_id: Option<&str>) -> Result<Vec<ModelVersionRecord>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id WHERE {filter} \
             ORDER BY m.name, m.owner_kind, m.owner_id, v.created_at_ms DESC, v.id DESC"
        );
        let mut query = sqlx::query_as::<_, VersionRow>(trusted_sql(sql));
        if let Some(user_id) = user_id {
            query = query.bind(user_id);
        }
        let rows = query.fetch_all(self.db.pool()).await?;
        rows.into_iter().map(version_from_row).collect()
    }
}

/// The `owner_kind` and `owner_id` columns of a model of `owner` (`None`: the platform).
fn owner_columns(owner: Option<&Owner>) -> (&'static str, &str) {
    owner.map_or(("platform", ""), |owner| (owner.kind(), owner.id()))
}
