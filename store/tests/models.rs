//! The model repository against real SQLite and real PostgreSQL: versions are immutable,
//! `latest` is the newest, bad names and paths are refused and change nothing.

mod common;

use common::TestDb;
use maas_store::StoreError;
use maas_store::repo::models::{LATEST, ModelFile, ModelMetadata, NewModelVersion};

on_both_backends!(
    versions_are_immutable_and_latest_is_the_newest,
    bad_versions_are_refused_and_change_nothing,
    blobs_nothing_refers_to_are_collected_after_the_grace_period,
    tenants_own_models_that_only_they_see,
);

fn file(path: &str, byte: char) -> ModelFile {
    ModelFile { path: path.into(), sha256: byte.to_string().repeat(64), size_bytes: 10 }
}

fn version(name: &str, version: Option<&str>, files: Vec<ModelFile>) -> NewModelVersion {
    NewModelVersion {
        name: name.into(),
        version: version.map(str::to_owned),
        description: "a tiny model".into(),
        metadata: ModelMetadata {
            format: "safetensors".into(),
            architecture: "LlamaForCausalLM".into(),
            parameters: 78_272,
            context_length: 512,
            dtype: "float32".into(),
            quantization: "none".into(),
            tasks: vec!["chat".into(), "completion".into()],
            config: serde_json::json!({"hidden_size": 64}),
        },
        files,
    }
}

async fn scope_of(t: &TestDb, email: &str, acting_as: Option<maas_store::Owner>) -> maas_store::TenantScope {
    let existing = t.db.users().find_by_email(email).await.unwrap();
    let id = match existing {
        Some(user) => user.id,
        None => {
            t.db.users()
                .create(maas_store::repo::users::NewUser {
                    email: Some(email.into()),
                    display_name: email.into(),
                    active: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .id
        }
    };
    maas_store::TenantScope::resolve(&t.db, &id, acting_as).await.unwrap()
}

/// TEN-1 for the repository: a tenant's model is theirs (and their organisation's
/// members'); its name may repeat the platform's or another tenant's; a deploying
/// tenant's own model comes before the platform's of the same name.
async fn tenants_own_models_that_only_they_see(t: &TestDb) {
    use maas_store::Owner;
    let models = t.db.models();
    let alice = scope_of(t, "alice@example.com", None).await;
    let bob = scope_of(t, "bob@example.com", None).await;
    let carol = scope_of(t, "carol@example.com", None).await;
    let platform = models.register_platform(version("tiny", None, vec![file("config.json", 'a')])).await.unwrap();
    let alices = models.register_in(&alice, version("tiny", None, vec![file("config.json", 'b')])).await.unwrap();
    assert_eq!(
        (alices.owner_kind.as_str(), alices.owner_id.as_str(), alices.version.as_str()),
        ("user", alice.user_id(), "v1")
    );
    let bobs = models.register_in(&bob, version("bobs-own", None, vec![file("config.json", 'c')])).await.unwrap();
    let again = models.register_in(&alice, version("tiny", Some("v1"), vec![file("x", 'd')])).await.unwrap_err();
    assert!(matches!(again, StoreError::Conflict(_)), "{again:?}");
    assert_eq!(
        t.db.usage().stored_bytes(alice.acting_as()).await.unwrap(),
        alices.total_bytes,
        "the storage quota counts it"
    );

    let names = |list: Vec<maas_store::repo::models::ModelVersionRecord>| {
        list.into_iter().map(|v| format!("{}:{}:{}", v.owner_kind, v.name, v.version)).collect::<Vec<_>>()
    };
    assert_eq!(names(models.list_visible(&alice).await.unwrap()), ["platform:tiny:v1", "user:tiny:v1"]);
    assert_eq!(names(models.list_visible(&bob).await.unwrap()), ["user:bobs-own:v1", "platform:tiny:v1"]);
    assert_eq!(names(models.list_platform().await.unwrap()), ["platform:tiny:v1"]);
    assert_eq!(models.list_all().await.unwrap().len(), 3);

    // Alice's `tiny` is hers; Bob's `tiny` is the platform's; Bob's own model is not Alice's.
    assert_eq!(models.find_for(Some(alice.acting_as()), "tiny", LATEST).await.unwrap(), alices);
    assert_eq!(models.find_for(Some(bob.acting_as()), "tiny", LATEST).await.unwrap(), platform);
    assert_eq!(models.find_for(Some(bob.acting_as()), "bobs-own", "v1").await.unwrap(), bobs);
    let hidden = models.find_for(Some(alice.acting_as()), "bobs-own", LATEST).await.unwrap_err();
    assert!(matches!(hidden, StoreError::NotFound { .. }), "{hidden:?}");
    assert_eq!(models.find(Some(&Owner::User(alice.user_id().into())), "tiny", "v1").await.unwrap(), alices);
    assert_eq!(models.find(None, "tiny", "v1").await.unwrap(), platform);
    assert_eq!(models.find_for(None, "tiny", LATEST).await.unwrap(), platform);

    // An organisation's model: its admins add them, its members see them, others do not.
    let org = t.db.orgs().create("acme", "ACME", alice.user_id()).await.unwrap();
    t.db.orgs().add_member(&org.id, carol.user_id(), maas_store::repo::orgs::OrgRole::Member).await.unwrap();
    let as_org = scope_of(t, "alice@example.com", Some(Owner::Org(org.id.clone()))).await;
    let carol_as_org = scope_of(t, "carol@example.com", Some(Owner::Org(org.id.clone()))).await;
    let orgs = models.register_in(&as_org, version("shared", None, vec![file("config.json", 'e')])).await.unwrap();
    assert_eq!((orgs.owner_kind.as_str(), orgs.owner_id.as_str()), ("org", org.id.as_str()));
    let refused = models.register_in(&carol_as_org, version("mine", None, vec![file("config.json", 'f')])).await;
    assert!(matches!(refused, Err(StoreError::Forbidden(_))), "{refused:?}");
    assert!(names(models.list_visible(&carol).await.unwrap()).contains(&"org:shared:v1".to_owned()));
    assert_eq!(models.find_for(Some(carol_as_org.acting_as()), "shared", LATEST).await.unwrap(), orgs);
    assert!(!names(models.list_visible(&bob).await.unwrap()).iter().any(|n| n.contains("shared")));
}

async fn versions_are_immutable_and_latest_is_the_newest(t: &TestDb) {
    let models = t.db.models();
    let first = models.register_platform(version("org/tiny", None, vec![file("config.json", 'a')])).await.unwrap();
    assert_eq!(first.version, "v1");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = models
        .register_platform(version("org/tiny", None, vec![file("config.json", 'b'), file("sub/w.safetensors", 'c')]))
        .await
        .unwrap();
    assert_eq!(second.version, "v2");
    assert_eq!(second.total_bytes, 20);
    assert_eq!(second.model_id, first.model_id);

    let again = models.register_platform(version("org/tiny", Some("v1"), vec![file("x", 'd')])).await.unwrap_err();
    assert!(matches!(&again, StoreError::Conflict(m) if m.contains("immutable")), "{again}");

    let latest = models.find_platform("org/tiny", LATEST).await.unwrap();
    assert_eq!(latest, second, "latest is the newest, read back whole");
    assert_eq!(models.find_platform("org/tiny", "v1").await.unwrap(), first);
    assert!(matches!(models.find_platform("org/tiny", "v9").await, Err(StoreError::NotFound { .. })));
    assert!(matches!(models.find_platform("nope", LATEST).await, Err(StoreError::NotFound { .. })));
    let listed = models.list_platform().await.unwrap();
    assert_eq!(listed.iter().map(|v| v.version.as_str()).collect::<Vec<_>>(), ["v2", "v1"]);
    assert!(t.db.blob_is_referenced(&"c".repeat(64)).await.unwrap());
    assert!(!t.db.blob_is_referenced(&"e".repeat(64)).await.unwrap());
}

async fn bad_versions_are_refused_and_change_nothing(t: &TestDb) {
    let models = t.db.models();
    let cases = [
        version("", None, vec![file("a", 'a')]),
        version("/abs", None, vec![file("a", 'a')]),
        version("a:b", None, vec![file("a", 'a')]),
        version("ok", Some("latest"), vec![file("a", 'a')]),
        version("ok", Some("has space"), vec![file("a", 'a')]),
        version("ok", None, vec![]),
        version("ok", None, vec![file("../etc/passwd", 'a')]),
        version("ok", None, vec![file("/etc/passwd", 'a')]),
        version("ok", None, vec![file("a", 'a'), file("a", 'b')]),
        version("ok", None, vec![ModelFile { path: "a".into(), sha256: "xyz".into(), size_bytes: 1 }]),
    ];
    for case in cases {
        let error = models.register_platform(case.clone()).await.unwrap_err();
        assert!(matches!(error, StoreError::InvalidInput(_)), "{case:?}: {error}");
    }
    assert!(models.list_platform().await.unwrap().is_empty());
}

/// Makes a blob look as if it was written `age` ago.
fn age_blob(blobs: &maas_store::BlobStore, digest: &maas_store::Digest, age: std::time::Duration) {
    let file = std::fs::File::options().append(true).open(blobs.path_of(digest)).unwrap();
    file.set_modified(std::time::SystemTime::now() - age).unwrap();
}

async fn blobs_nothing_refers_to_are_collected_after_the_grace_period(t: &TestDb) {
    use maas_store::repo::files::NewFile;
    use maas_store::repo::knowledge::{NewDocument, NewKnowledgeBase};
    let dir = tempfile::tempdir().unwrap();
    let blobs = maas_store::BlobStore::open(dir.path().join("blobs")).await.unwrap();
    let put = |text: &'static str| {
        let blobs = blobs.clone();
        async move { blobs.put_bytes(text.as_bytes()).await.unwrap() }
    };
    let (weights, upload, document, orphan, fresh) =
        (put("weights").await, put("upload").await, put("document").await, put("orphan").await, put("fresh").await);
    let day = std::time::Duration::from_secs(24 * 3600);
    for info in [&weights, &upload, &document, &orphan] {
        age_blob(&blobs, &info.digest, 2 * day);
    }

    let model_file = ModelFile { path: "w.safetensors".into(), sha256: weights.digest.to_hex(), size_bytes: 7 };
    t.db.models().register_platform(version("org/gc", None, vec![model_file])).await.unwrap();
    let user =
        t.db.users()
            .create(maas_store::repo::users::NewUser {
                email: Some("gc@example.com".into()),
                display_name: "gc".into(),
                active: true,
                ..Default::default()
            })
            .await
            .unwrap();
    let scope = maas_store::TenantScope::resolve(&t.db, &user.id, None).await.unwrap();
    t.db.files()
        .create(
            &scope,
            NewFile { filename: "u".into(), purpose: "batch".into(), size_bytes: 6, sha256: upload.digest.to_hex() },
        )
        .await
        .unwrap();
    let kb =
        t.db.knowledge_bases()
            .create(
                &scope,
                NewKnowledgeBase {
                    name: "kb".into(),
                    embedding_model: "m".into(),
                    vector_backend: "embedded".into(),
                    shard_count: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    t.db.knowledge_bases()
        .add_document(
            &scope,
            &kb.id,
            NewDocument {
                filename: "d.md".into(),
                kind: "markdown".into(),
                sha256: document.digest.to_hex(),
                size_bytes: 8,
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let report = maas_store::gc::collect_garbage(&t.db, &blobs, day).await.unwrap();
    assert_eq!(
        report,
        maas_store::gc::GcReport { examined: 4, removed: 1, removed_bytes: 6 },
        "only the old blob nothing refers to goes; the young one waits out its grace period"
    );
    assert!(!blobs.contains(&orphan.digest).await);
    for kept in [&weights, &upload, &document, &fresh] {
        assert!(blobs.contains(&kept.digest).await);
    }

    // Writing content that is already stored makes its blob young again, so a reference
    // made after the write finds it kept.
    age_blob(&blobs, &fresh.digest, 2 * day);
    put("fresh").await;
    let report = maas_store::gc::collect_garbage(&t.db, &blobs, day).await.unwrap();
    assert_eq!(report.removed, 0, "{report:?}");
    assert!(blobs.contains(&fresh.digest).await);
}
