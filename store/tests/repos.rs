//! The repository layer against real SQLite and real PostgreSQL: the same suite on both.

mod common;

use common::TestDb;
use maas_store::repo::files::NewFile;
use maas_store::repo::orgs::OrgRole;
use maas_store::repo::users::{NewUser, Role};
use maas_store::{Backend, Owner, StoreError, TenantScope};

on_both_backends!(
    migrations_are_idempotent,
    users_are_created_and_unique,
    a_user_needs_an_email_or_a_phone,
    organisations_have_owners_and_members,
    scopes_refuse_unknown_users_and_foreign_orgs,
    tenants_cannot_see_each_others_files,
    org_files_follow_org_roles,
    acknowledged_writes_survive_a_reconnect,
    usage_is_costed_and_summed_per_tenant,
    oauth_states_are_spent_once_and_identities_link_once,
    knowledge_bases_are_tenant_owned_and_documents_move_through_ingestion,
);

async fn user(t: &TestDb, email: &str) -> String {
    t.db.users()
        .create(NewUser { email: Some(email.into()), display_name: email.into(), active: true, ..NewUser::default() })
        .await
        .expect("user is created")
        .id
}

fn new_file(name: &str) -> NewFile {
    NewFile { filename: name.into(), purpose: "batch".into(), size_bytes: 10, sha256: "0".repeat(64) }
}

async fn migrations_are_idempotent(t: &TestDb) {
    t.db.migrate().await.expect("second migration run is a no-op");
    assert_eq!(t.db.latest_migration(), 11);
}

async fn users_are_created_and_unique(t: &TestDb) {
    let created =
        t.db.users()
            .create(NewUser {
                email: Some("  Alice@Example.com ".into()),
                display_name: "Alice".into(),
                role: Some(Role::Admin),
                ..NewUser::default()
            })
            .await
            .unwrap();
    assert_eq!(created.email.as_deref(), Some("alice@example.com"));
    assert_eq!(created.role, Role::Admin);
    assert_eq!(created.status, "pending");
    assert_eq!(t.db.users().get(&created.id).await.unwrap(), created);
    assert_eq!(t.db.users().find_by_email("ALICE@example.com").await.unwrap(), Some(created.clone()));

    let again = t.db.users().create(NewUser { email: Some("alice@example.com".into()), ..NewUser::default() }).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(t.db.users().count().await.unwrap(), 1, "a rejected create changes nothing");
    assert!(matches!(t.db.users().get("user-missing").await, Err(StoreError::NotFound { .. })));
}

async fn a_user_needs_an_email_or_a_phone(t: &TestDb) {
    let result = t.db.users().create(NewUser { display_name: "nobody".into(), ..NewUser::default() }).await;
    assert!(matches!(result, Err(StoreError::InvalidInput(_))), "{result:?}");
    let by_phone = t
        .db
        .users()
        .create(NewUser { phone: Some("+8613800000000".into()), display_name: "phone".into(), ..NewUser::default() })
        .await
        .unwrap();
    assert_eq!(by_phone.phone.as_deref(), Some("+8613800000000"));
}

async fn organisations_have_owners_and_members(t: &TestDb) {
    let alice = user(t, "alice@example.com").await;
    let bob = user(t, "bob@example.com").await;
    let org = t.db.orgs().create("acme", "ACME", &alice).await.unwrap();
    t.db.orgs().add_member(&org.id, &bob, OrgRole::Member).await.unwrap();
    assert!(matches!(t.db.orgs().add_member(&org.id, &bob, OrgRole::Admin).await, Err(StoreError::Conflict(_))));
    assert!(matches!(t.db.orgs().create("acme", "again", &bob).await, Err(StoreError::Conflict(_))));
    for bad in ["A", "-x", "has space", ""] {
        assert!(matches!(t.db.orgs().create(bad, "bad", &bob).await, Err(StoreError::InvalidInput(_))), "{bad}");
    }
    assert_eq!(t.db.orgs().list_for_user(&bob).await.unwrap(), vec![org]);
}

async fn scopes_refuse_unknown_users_and_foreign_orgs(t: &TestDb) {
    let alice = user(t, "alice@example.com").await;
    let bob = user(t, "bob@example.com").await;
    let org = t.db.orgs().create("acme", "ACME", &alice).await.unwrap();

    let unknown = TenantScope::resolve(&t.db, "user-nobody", None).await;
    assert!(matches!(unknown, Err(StoreError::NotFound { .. })), "{unknown:?}");
    let foreign = TenantScope::resolve(&t.db, &bob, Some(Owner::Org(org.id.clone()))).await;
    assert!(matches!(foreign, Err(StoreError::Forbidden(_))), "{foreign:?}");
    let impersonation = TenantScope::resolve(&t.db, &bob, Some(Owner::User(alice.clone()))).await;
    assert!(matches!(impersonation, Err(StoreError::Forbidden(_))), "{impersonation:?}");

    let own = TenantScope::resolve(&t.db, &alice, Some(Owner::Org(org.id.clone()))).await.unwrap();
    assert_eq!(own.acting_as(), &Owner::Org(org.id));
}

async fn tenants_cannot_see_each_others_files(t: &TestDb) {
    let alice = TenantScope::resolve(&t.db, &user(t, "alice@example.com").await, None).await.unwrap();
    let bob = TenantScope::resolve(&t.db, &user(t, "bob@example.com").await, None).await.unwrap();
    let file = t.db.files().create(&alice, new_file("a.jsonl")).await.unwrap();
    assert_eq!(file.owner, Owner::User(alice.user_id().into()));

    // TEN-1: bob cannot read, list or delete alice's file, and learns nothing of its existence.
    assert!(matches!(t.db.files().get(&bob, &file.id).await, Err(StoreError::NotFound { .. })));
    assert!(t.db.files().list(&bob).await.unwrap().is_empty());
    assert!(matches!(t.db.files().delete(&bob, &file.id).await, Err(StoreError::NotFound { .. })));

    assert_eq!(t.db.files().get(&alice, &file.id).await.unwrap(), file);
    assert_eq!(t.db.files().list(&alice).await.unwrap(), vec![file.clone()]);
    assert_eq!(t.db.files().delete(&alice, &file.id).await.unwrap(), file);
    assert!(matches!(t.db.files().get(&alice, &file.id).await, Err(StoreError::NotFound { .. })));
}

async fn org_files_follow_org_roles(t: &TestDb) {
    let owner = user(t, "owner@example.com").await;
    let member = user(t, "member@example.com").await;
    let outsider = user(t, "outsider@example.com").await;
    let org = t.db.orgs().create("acme", "ACME", &owner).await.unwrap();
    t.db.orgs().add_member(&org.id, &member, OrgRole::Member).await.unwrap();
    let as_org = Some(Owner::Org(org.id.clone()));

    let owner_scope = TenantScope::resolve(&t.db, &owner, as_org.clone()).await.unwrap();
    let member_scope = TenantScope::resolve(&t.db, &member, as_org).await.unwrap();
    let outsider_scope = TenantScope::resolve(&t.db, &outsider, None).await.unwrap();
    let file = t.db.files().create(&member_scope, new_file("shared.pdf")).await.unwrap();
    assert_eq!(file.owner, Owner::Org(org.id.clone()));

    assert_eq!(t.db.files().get(&owner_scope, &file.id).await.unwrap(), file);
    assert_eq!(t.db.files().list(&owner_scope).await.unwrap(), vec![file.clone()]);
    assert!(matches!(t.db.files().get(&outsider_scope, &file.id).await, Err(StoreError::NotFound { .. })));
    // A plain member may read but not delete the organisation's file; an owner may.
    assert!(matches!(t.db.files().delete(&member_scope, &file.id).await, Err(StoreError::Forbidden(_))));
    assert_eq!(t.db.files().get(&member_scope, &file.id).await.unwrap(), file, "a refused delete changes nothing");
    t.db.files().delete(&owner_scope, &file.id).await.unwrap();
}

async fn acknowledged_writes_survive_a_reconnect(t: &TestDb) {
    let alice_id = user(t, "alice@example.com").await;
    let alice = TenantScope::resolve(&t.db, &alice_id, None).await.unwrap();
    let file = t.db.files().create(&alice, new_file("kept.txt")).await.unwrap();
    t.db.close().await;
    let reopened = t.reopen().await;
    let alice = TenantScope::resolve(&reopened, &alice_id, None).await.unwrap();
    assert_eq!(reopened.files().get(&alice, &file.id).await.unwrap(), file);
    reopened.close().await;
}

/// The two migration sets must describe the same tables and columns.
#[tokio::test]
async fn sqlite_and_postgres_schemas_match() {
    let sqlite = common::sqlite().await;
    let postgres = common::postgres().await;
    assert_eq!(sqlite.db.backend(), Backend::Sqlite);
    assert_eq!(postgres.db.backend(), Backend::Postgres);
    let mut sqlite_columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name NOT LIKE '\\_sqlx%' ESCAPE '\\' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         ORDER BY m.name, p.name",
    )
    .fetch_all(sqlite.db.pool())
    .await
    .unwrap();
    let mut postgres_columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%' ORDER BY table_name, column_name",
    )
    .fetch_all(postgres.db.pool())
    .await
    .unwrap();
    // Collations differ between the engines, so compare in Rust's byte order.
    sqlite_columns.sort();
    postgres_columns.sort();
    assert!(!sqlite_columns.is_empty());
    assert_eq!(sqlite_columns, postgres_columns);
}

async fn usage_is_costed_and_summed_per_tenant(t: &TestDb) {
    use maas_store::repo::usage::{NewUsage, Price, UsageKind};
    let alice = user(t, "alice@example.com").await;
    let bob = user(t, "bob@example.com").await;
    t.db.usage()
        .set_price("chat", Price { input_per_1k_micros: 1500, output_per_1k_micros: 2000, gpu_hour_micros: 0 })
        .await
        .unwrap();
    t.db.usage()
        .set_price("*", Price { input_per_1k_micros: 1, output_per_1k_micros: 1, gpu_hour_micros: 3600 })
        .await
        .unwrap();
    let record = |owner: &str, model: &str, prompt: u64, completion: u64, status: u16| NewUsage {
        owner: Owner::User(owner.into()),
        user_id: owner.into(),
        key_id: None,
        kind: UsageKind::Inference,
        model: model.into(),
        endpoint: "chat".into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        gpu_seconds: 0,
        storage_bytes: 0,
        latency_ms: 5,
        status,
        at_ms: maas_store::ids::now_ms(),
    };
    for usage in [
        record(&alice, "chat", 1000, 500, 200),
        record(&alice, "chat", 10, 3, 200),
        record(&alice, "other", 2000, 0, 500),
        record(&bob, "chat", 7, 7, 200),
    ] {
        t.db.usage().record(&usage).await.unwrap();
    }
    let scope = TenantScope::resolve(&t.db, &alice, None).await.unwrap();
    let rows = t.db.usage().summary(&scope, 0, i64::MAX).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let chat = &rows[0];
    assert_eq!(
        (chat.model.as_str(), chat.requests, chat.prompt_tokens, chat.completion_tokens),
        ("chat", 2, 1010, 503)
    );
    // 1000*1.5 + 500*2 = 2500 micros, then (10*1500 + 3*2000) / 1000 = 21: costed per record.
    assert_eq!(chat.cost_micros, 2521);
    let other = &rows[1];
    assert_eq!((other.model.as_str(), other.errors, other.cost_micros), ("other", 1, 2), "the default price applies");
    let bob_scope = TenantScope::resolve(&t.db, &bob, None).await.unwrap();
    let bobs = t.db.usage().summary(&bob_scope, 0, i64::MAX).await.unwrap();
    assert_eq!((bobs.len(), bobs[0].requests), (1, 1), "each tenant sees its own usage");
    assert_eq!(t.db.usage().stored_bytes(&Owner::User(alice.clone())).await.unwrap(), 0);

    // Storage samples: one record per owner with files, kept out of the request counts.
    t.db.files().create(&scope, new_file("a.jsonl")).await.unwrap();
    t.db.files().create(&scope, new_file("b.jsonl")).await.unwrap();
    assert_eq!(t.db.usage().sample_storage(maas_store::ids::now_ms()).await.unwrap(), 1);
    let storage = t.db.usage().storage_by_day(&scope, 0, i64::MAX).await.unwrap();
    assert_eq!(storage.len(), 1);
    assert_eq!(storage[0].1, 20, "two files of 10 bytes");
    let rows = t.db.usage().summary(&scope, 0, i64::MAX).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 3, "samples are not requests");
    assert!(t.db.usage().storage_by_day(&bob_scope, 0, i64::MAX).await.unwrap().is_empty());
}

fn pending(state: &str, expires_at_ms: i64) -> maas_store::repo::identities::PendingSignIn {
    maas_store::repo::identities::PendingSignIn {
        state_sha256: state.into(),
        provider: "corp".into(),
        pkce_verifier: "verifier".into(),
        nonce: "nonce".into(),
        redirect_uri: "http://127.0.0.1/v1/auth/oauth/corp/callback".into(),
        return_to: "/".into(),
        expires_at_ms,
    }
}

async fn oauth_states_are_spent_once_and_identities_link_once(t: &TestDb) {
    let identities = t.db.identities();
    let later = maas_store::ids::now_ms() + 60_000;
    identities.begin(&pending("live", later)).await.expect("state is saved");
    identities.begin(&pending("stale", maas_store::ids::now_ms() - 1)).await.expect("state is saved");
    assert!(matches!(identities.begin(&pending("live", later)).await, Err(StoreError::Conflict(_))));
    let (first, second) = tokio::join!(identities.take("live"), identities.take("live"));
    let taken = [first.expect("take"), second.expect("take")];
    assert_eq!(taken.iter().flatten().count(), 1, "two racing callbacks spend a state once: {taken:?}");
    assert_eq!(taken.iter().flatten().next().map(|p| p.nonce.as_str()), Some("nonce"));
    assert_eq!(identities.take("live").await.expect("take"), None, "a spent state is gone");
    assert_eq!(identities.take("stale").await.expect("take"), None, "an expired state does not work");
    assert_eq!(identities.take("unknown").await.expect("take"), None);

    let alice = user(t, "alice-oauth@example.com").await;
    let bob = user(t, "bob-oauth@example.com").await;
    assert_eq!(identities.find("corp", "sub-1").await.expect("find"), None);
    let linked = identities.link("corp", "sub-1", &alice, Some("alice-oauth@example.com")).await.expect("link");
    assert_eq!((linked.user_id.as_str(), linked.email.as_deref()), (alice.as_str(), Some("alice-oauth@example.com")));
    assert!(
        matches!(identities.link("corp", "sub-1", &bob, None).await, Err(StoreError::Conflict(_))),
        "one provider account links to one user"
    );
    identities
        .link("github", "sub-1", &bob, None)
        .await
        .expect("the same subject at another provider is another account");
    identities.touch("corp", "sub-1", Some("alice-new@example.com")).await.expect("touch");
    let found = identities.find("corp", "sub-1").await.expect("find").expect("linked");
    assert_eq!((found.user_id, found.email.as_deref()), (alice.clone(), Some("alice-new@example.com")));
    assert_eq!(identities.for_user(&alice).await.expect("list").len(), 1);
    assert_eq!(identities.for_user(&bob).await.expect("list")[0].provider, "github");
}

fn stored_chunk(
    document_id: &str,
    chunk_id: i64,
    level: &str,
    ordinal: i64,
) -> maas_store::repo::knowledge::StoredChunk {
    maas_store::repo::knowledge::StoredChunk {
        chunk_id,
        document_id: document_id.into(),
        level: level.into(),
        ordinal,
        parent_ordinal: (level == "child").then_some(0),
        text: format!("{level} {ordinal}"),
        token_count: 3,
        page_start: 1,
        page_end: 2,
        heading_path: vec!["Intro".into()],
        embedded: false,
    }
}

async fn knowledge_bases_are_tenant_owned_and_documents_move_through_ingestion(t: &TestDb) {
    use maas_store::repo::knowledge::{DocumentState, NewDocument, NewKnowledgeBase};
    let kbs = t.db.knowledge_bases();
    let alice = TenantScope::resolve(&t.db, &user(t, "alice-kb@example.com").await, None).await.unwrap();
    let bob = TenantScope::resolve(&t.db, &user(t, "bob-kb@example.com").await, None).await.unwrap();
    let new_kb = || NewKnowledgeBase {
        name: "handbook".into(),
        embedding_model: "minilm".into(),
        vector_backend: "embedded".into(),
        shard_count: 2,
        settings: serde_json::json!({"chunking": {"max_tokens": 256}}),
        ..NewKnowledgeBase::default()
    };
    let kb = kbs.create(&alice, new_kb()).await.unwrap();
    assert!(matches!(kbs.create(&alice, new_kb()).await, Err(StoreError::Conflict(_))), "names are unique per owner");
    kbs.create(&bob, new_kb()).await.expect("another owner may use the name");
    // TEN-1: bob reaches nothing of alice's knowledge base.
    assert!(matches!(kbs.get(&bob, &kb.id).await, Err(StoreError::NotFound { .. })));
    assert_eq!(kbs.list(&bob).await.unwrap().len(), 1);
    let doc = || NewDocument {
        filename: "guide.md".into(),
        kind: "markdown".into(),
        sha256: "0".repeat(64),
        size_bytes: 10,
        tags: vec!["hr".into()],
        category: String::new(),
    };
    assert!(matches!(kbs.add_document(&bob, &kb.id, doc()).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(kbs.documents(&bob, &kb.id).await, Err(StoreError::NotFound { .. })));

    let first = kbs.add_document(&alice, &kb.id, doc()).await.unwrap();
    let second = kbs.add_document(&alice, &kb.id, doc()).await.unwrap();
    assert_eq!((first.version, second.version, first.state), (1, 2, DocumentState::Queued));
    assert_eq!(first.tags, vec!["hr".to_owned()]);
    assert!(matches!(kbs.scoped_document(&bob, &kb.id, &first.id).await, Err(StoreError::NotFound { .. })));

    // One worker holds a document at a time; the claim goes oldest first.
    let claimed = kbs.claim_document("node-a", 60_000).await.unwrap().expect("work");
    assert_eq!(claimed.id, first.id);
    let other = kbs.claim_document("node-b", 60_000).await.unwrap().expect("work");
    assert_eq!(other.id, second.id, "a leased document is not handed out twice");
    assert_eq!(kbs.claim_document("node-c", 60_000).await.unwrap(), None);

    for document in [&first, &second] {
        let chunks = vec![
            stored_chunk(&document.id, document.version * 100, "parent", 0),
            stored_chunk(&document.id, document.version * 100 + 1, "child", 0),
            stored_chunk(&document.id, document.version * 100 + 2, "child", 1),
        ];
        kbs.save_chunks(&document.id, 2, &chunks).await.unwrap();
        kbs.save_chunks(&document.id, 2, &chunks).await.expect("a re-run replaces, it does not duplicate");
        let pending = kbs.chunks_to_embed(&document.id, 10).await.unwrap();
        assert_eq!(pending.iter().map(|c| c.ordinal).collect::<Vec<_>>(), vec![0, 1]);
        kbs.mark_embedded(&document.id, &[pending[0].chunk_id]).await.unwrap();
        let progress = kbs.document(&document.id).await.unwrap();
        assert_eq!((progress.state, progress.chunks_total, progress.chunks_embedded), (DocumentState::Embedding, 2, 1));
        assert_eq!(kbs.chunks_to_embed(&document.id, 10).await.unwrap().len(), 1);
    }
    assert_eq!(kbs.finish_indexed(&first.id).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        kbs.finish_indexed(&second.id).await.unwrap(),
        vec![first.id.clone()],
        "the new version retires the old"
    );
    assert_eq!(kbs.document(&first.id).await.unwrap().state, DocumentState::Retired);
    let chunks = kbs.chunks(&kb.id, &[201, 202, 999]).await.unwrap();
    assert_eq!(chunks.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), vec!["child 0", "child 1"]);
    assert_eq!(chunks[0].heading_path, vec!["Intro".to_owned()]);
    assert!(kbs.chunks("other", &[201]).await.unwrap().is_empty(), "chunks are reached through their kb");

    // Deleting: bob cannot; alice marks it, the worker purges it.
    assert!(kbs.delete_document(&bob, &kb.id, &second.id).await.is_err());
    assert_eq!(kbs.delete_document(&alice, &kb.id, &second.id).await.unwrap().state, DocumentState::Deleting);
    assert_eq!(kbs.claim_document("node-a", 60_000).await.unwrap().map(|d| d.id), Some(second.id.clone()));
    kbs.purge_document(&second.id).await.unwrap();
    assert!(kbs.document(&second.id).await.is_err());
    assert!(kbs.chunks(&kb.id, &[201]).await.unwrap().is_empty(), "its chunks went with it");
    assert!(matches!(kbs.delete(&bob, &kb.id).await, Err(StoreError::NotFound { .. })));
    kbs.delete(&alice, &kb.id).await.unwrap();
    assert!(kbs.document(&first.id).await.is_err(), "documents go with their knowledge base");
}
