//! Test databases: a SQLite file in a temporary directory, or a fresh PostgreSQL
//! database (`maas_test_<uuid>`) on the server at `MAAS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the test ends.

#![allow(dead_code)]

use maas_store::repo::users::NewUser;
use maas_store::{Db, DbOptions, TenantScope};
use sqlx::Connection;

pub struct TestDb {
    pub db: Db,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(#[allow(unused)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

pub fn postgres_admin_url() -> String {
    std::env::var("MAAS_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = Db::connect(&DbOptions::new(maas_store::db::sqlite_url_in(dir.path()))).await.expect("sqlite opens");
    db.migrate().await.expect("sqlite migrates");
    TestDb { db, cleanup: Cleanup::Sqlite(dir) }
}

pub async fn postgres() -> TestDb {
    let admin_url = postgres_admin_url();
    let name = format!("maas_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("postgres at {admin_url} is needed by the store tests: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    let (base, _) = admin_url.rsplit_once('/').expect("admin url ends in /DATABASE");
    let db = Db::connect(&DbOptions::new(format!("{base}/{name}"))).await.expect("postgres test database opens");
    db.migrate().await.expect("postgres migrates");
    TestDb { db, cleanup: Cleanup::Postgres { admin_url, name } }
}

impl TestDb {
    /// Reconnects to the same database, as a restarted process would.
    pub async fn reopen(&self) -> Db {
        let url = match &self.cleanup {
            Cleanup::Sqlite(dir) => maas_store::db::sqlite_url_in(dir.path()),
            Cleanup::Postgres { admin_url, name } => {
                format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0)
            }
        };
        Db::connect(&DbOptions::new(url)).await.expect("reopen")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Cleanup::Postgres { admin_url, name } = &self.cleanup {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime, so the cleanup gets a runtime of its own.
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                        let _ =
                            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                                .execute(&mut admin)
                                .await;
                    }
                });
            })
            .join()
            .ok();
        }
    }
}

/// Runs each named `async fn(&TestDb)` against SQLite and against PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let test_db = super::common::sqlite().await;
                    super::$name(&test_db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let test_db = super::common::postgres().await;
                    super::$name(&test_db).await;
                }
            )*
        }
    };
}

/// The scope of a new active user with `email`, acting for themselves.
pub async fn scope(t: &TestDb, email: &str) -> TenantScope {
    let id = t
        .db
        .users()
        .create(NewUser { email: Some(email.into()), display_name: email.into(), active: true, ..NewUser::default() })
        .await
        .expect("user is created")
        .id;
    TenantScope::resolve(&t.db, &id, None).await.unwrap()
}
