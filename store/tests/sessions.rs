//! Chat sessions against real SQLite and real PostgreSQL: create, list, append turns in
//! order, delete, and TEN-1 (another tenant cannot read, continue or delete a session).

mod common;

use common::{TestDb, scope};
use maas_store::repo::orgs::OrgRole;
use maas_store::repo::sessions::{MessageRole, NewChatSession, NewSessionMessage};
use maas_store::{Owner, StoreError, TenantScope};
use serde_json::json;

on_both_backends!(
    sessions_keep_their_turns_in_order,
    tenants_cannot_see_each_others_sessions,
    org_sessions_follow_org_roles,
    bad_sessions_and_messages_are_refused_and_change_nothing,
    deleting_a_session_deletes_its_messages,
);

fn new_session() -> NewChatSession {
    NewChatSession {
        model: "chat".into(),
        system_prompt: Some("be brief".into()),
        sampling: json!({"temperature": 0.0, "max_tokens": 16}),
        title: None,
    }
}

fn turn(question: &str, answer: &str, finish_reason: &str) -> Vec<NewSessionMessage> {
    vec![
        NewSessionMessage {
            role: MessageRole::User,
            content: question.into(),
            finish_reason: None,
            error: None,
            prompt_tokens: None,
            completion_tokens: None,
        },
        NewSessionMessage {
            role: MessageRole::Assistant,
            content: answer.into(),
            finish_reason: Some(finish_reason.into()),
            error: None,
            prompt_tokens: Some(12),
            completion_tokens: Some(3),
        },
    ]
}

async fn sessions_keep_their_turns_in_order(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let session = t.db.sessions().create(&alice, new_session()).await.unwrap();
    assert_eq!(session.owner, Owner::User(alice.user_id().into()));
    assert_eq!(session.title, None);
    assert_eq!(t.db.sessions().get(&alice, &session.id).await.unwrap(), session);
    assert!(t.db.sessions().messages(&alice, &session.id).await.unwrap().is_empty());

    let first =
        t.db.sessions().append(&alice, &session.id, turn("  \nhello there\nsecond line", "hi", "stop")).await.unwrap();
    assert_eq!(first.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    let second = t.db.sessions().append(&alice, &session.id, turn("more", "partial", "cancelled")).await.unwrap();
    assert_eq!(second.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);

    let messages = t.db.sessions().messages(&alice, &session.id).await.unwrap();
    assert_eq!(messages, [first, second].concat());
    assert_eq!(messages[0].role, MessageRole::User);
    assert_eq!(messages[3].finish_reason.as_deref(), Some("cancelled"));
    assert_eq!(messages[3].prompt_tokens, Some(12));

    let reloaded = t.db.sessions().get(&alice, &session.id).await.unwrap();
    assert_eq!(reloaded.title.as_deref(), Some("hello there"), "the first user message names the session");
    assert!(reloaded.updated_at_ms >= session.updated_at_ms);
    assert_eq!(reloaded.sampling, json!({"temperature": 0.0, "max_tokens": 16}));
    assert_eq!(t.db.sessions().list(&alice).await.unwrap(), vec![reloaded]);
}

async fn tenants_cannot_see_each_others_sessions(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let bob = scope(t, "bob@example.com").await;
    let session = t.db.sessions().create(&alice, new_session()).await.unwrap();
    t.db.sessions().append(&alice, &session.id, turn("secret", "kept", "stop")).await.unwrap();

    // TEN-1: bob cannot read, list, continue or delete alice's session, and learns
    // nothing of its existence.
    let not_found =
        |result: &Result<_, StoreError>| matches!(result, Err(StoreError::NotFound { what: "session", .. }));
    assert!(not_found(&t.db.sessions().get(&bob, &session.id).await.map(|_| ())));
    assert!(not_found(&t.db.sessions().messages(&bob, &session.id).await.map(|_| ())));
    assert!(not_found(&t.db.sessions().append(&bob, &session.id, turn("mine?", "no", "stop")).await.map(|_| ())));
    assert!(not_found(&t.db.sessions().delete(&bob, &session.id).await.map(|_| ())));
    assert!(t.db.sessions().list(&bob).await.unwrap().is_empty());

    assert_eq!(t.db.sessions().messages(&alice, &session.id).await.unwrap().len(), 2, "bob changed nothing");
}

async fn org_sessions_follow_org_roles(t: &TestDb) {
    let owner = scope(t, "owner@example.com").await;
    let member = scope(t, "member@example.com").await;
    let org = t.db.orgs().create("acme", "ACME", owner.user_id()).await.unwrap();
    t.db.orgs().add_member(&org.id, member.user_id(), OrgRole::Member).await.unwrap();
    let as_org = Some(Owner::Org(org.id.clone()));
    let owner_scope = TenantScope::resolve(&t.db, owner.user_id(), as_org.clone()).await.unwrap();
    let member_scope = TenantScope::resolve(&t.db, member.user_id(), as_org).await.unwrap();

    let session = t.db.sessions().create(&owner_scope, new_session()).await.unwrap();
    assert_eq!(session.owner, Owner::Org(org.id));
    assert_eq!(t.db.sessions().get(&member_scope, &session.id).await.unwrap(), session);
    // A plain member may read the organisation's session but not continue or delete it.
    let refused = t.db.sessions().append(&member_scope, &session.id, turn("hi", "hello", "stop")).await;
    assert!(matches!(refused, Err(StoreError::Forbidden(_))), "{refused:?}");
    assert!(matches!(t.db.sessions().delete(&member_scope, &session.id).await, Err(StoreError::Forbidden(_))));
    assert!(t.db.sessions().messages(&owner_scope, &session.id).await.unwrap().is_empty(), "refusals change nothing");
    t.db.sessions().append(&owner_scope, &session.id, turn("hi", "hello", "stop")).await.unwrap();
}

async fn bad_sessions_and_messages_are_refused_and_change_nothing(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let no_model = t.db.sessions().create(&alice, NewChatSession { model: String::new(), ..new_session() }).await;
    assert!(matches!(no_model, Err(StoreError::InvalidInput(_))), "{no_model:?}");
    let bad_sampling = t.db.sessions().create(&alice, NewChatSession { sampling: json!([1]), ..new_session() }).await;
    assert!(matches!(bad_sampling, Err(StoreError::InvalidInput(_))), "{bad_sampling:?}");
    assert!(t.db.sessions().list(&alice).await.unwrap().is_empty());

    let session = t.db.sessions().create(&alice, new_session()).await.unwrap();
    let mut unfinished = turn("q", "a", "stop");
    unfinished[1].finish_reason = None;
    let mut odd = turn("q", "a", "exploded");
    odd[0].finish_reason = Some("stop".into());
    for messages in [unfinished, turn("q", "a", "exploded"), odd] {
        let result = t.db.sessions().append(&alice, &session.id, messages).await;
        assert!(matches!(result, Err(StoreError::InvalidInput(_))), "{result:?}");
    }
    assert!(t.db.sessions().messages(&alice, &session.id).await.unwrap().is_empty());
    assert_eq!(t.db.sessions().get(&alice, &session.id).await.unwrap(), session, "a refused append changes nothing");
}

async fn deleting_a_session_deletes_its_messages(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let session = t.db.sessions().create(&alice, new_session()).await.unwrap();
    t.db.sessions().append(&alice, &session.id, turn("q", "a", "failed")).await.unwrap();
    assert_eq!(t.db.sessions().delete(&alice, &session.id).await.unwrap().id, session.id);
    assert!(matches!(t.db.sessions().get(&alice, &session.id).await, Err(StoreError::NotFound { .. })));
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_session_messages WHERE session_id = $1")
        .bind(&session.id)
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
}
