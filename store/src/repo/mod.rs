//! Repositories: typed queries over the tenant-data tables. Tenant-owned tables are only
//! reachable through a [`crate::TenantScope`].

pub mod audit;
pub mod batches;
pub mod credentials;
pub mod files;
pub mod fine_tuning;
pub mod identities;
pub mod keys;
pub mod knowledge;
mod lease;
pub mod models;
pub mod orgs;
pub mod outbox;
pub mod safety;
pub mod sessions;
pub mod usage;
pub mod users;

use crate::db::Db;

impl Db {
    pub fn users(&self) -> users::Users<'_> {
        users::Users { db: self }
    }

    pub fn orgs(&self) -> orgs::Orgs<'_> {
        orgs::Orgs { db: self }
    }

    pub fn files(&self) -> files::Files<'_> {
        files::Files { db: self }
    }

    pub fn safety_rules(&self) -> safety::SafetyRules<'_> {
        safety::SafetyRules { db: self }
    }

    pub fn batches(&self) -> batches::Batches<'_> {
        batches::Batches { db: self }
    }

    pub fn fine_tuning_jobs(&self) -> fine_tuning::FineTuningJobs<'_> {
        fine_tuning::FineTuningJobs { db: self }
    }

    pub fn models(&self) -> models::Models<'_> {
        models::Models { db: self }
    }

    pub fn credentials(&self) -> credentials::Credentials<'_> {
        credentials::Credentials { db: self }
    }

    pub fn identities(&self) -> identities::Identities<'_> {
        identities::Identities { db: self }
    }

    pub fn knowledge_bases(&self) -> knowledge::KnowledgeBases<'_> {
        knowledge::KnowledgeBases { db: self }
    }

    pub fn api_keys(&self) -> keys::ApiKeys<'_> {
        keys::ApiKeys { db: self }
    }

    pub fn usage(&self) -> usage::Usage<'_> {
        usage::Usage { db: self }
    }

    pub fn audit(&self) -> audit::AuditLog<'_> {
        audit::AuditLog { db: self }
    }

    pub fn outbox(&self) -> outbox::Outbox<'_> {
        outbox::Outbox { db: self }
    }

    pub fn sessions(&self) -> sessions::Sessions<'_> {
        sessions::Sessions { db: self }
    }
}
