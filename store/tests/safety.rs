//! Safety rules and the built-in local user against real SQLite and real PostgreSQL:
//! rules are tenant-owned (TEN-1), organisation rules apply to members and only owners and
//! admins may delete them, and bad rules change nothing.

mod common;

use common::TestDb;
use maas_store::repo::orgs::OrgRole;
use maas_store::repo::safety::{Direction, NewRule, RuleKind};
use maas_store::repo::users::{LOCAL_USER_ID, NewUser, Role};
use maas_store::{Owner, StoreError, TenantScope};

on_both_backends!(
    rules_are_tenant_owned_and_org_rules_reach_members,
    bad_rules_are_refused_and_change_nothing,
    the_local_user_is_made_once
);

async fn scope(t: &TestDb, email: &str) -> TenantScope {
    let user = t
        .db
        .users()
        .create(NewUser { email: Some(email.into()), display_name: email.into(), active: true, ..NewUser::default() })
        .await
        .unwrap();
    TenantScope::resolve(&t.db, &user.id, None).await.unwrap()
}

fn rule(pattern: &str) -> NewRule {
    NewRule { direction: Direction::Both, kind: RuleKind::Keyword, pattern: pattern.into(), reason: "no".into() }
}

async fn rules_are_tenant_owned_and_org_rules_reach_members(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let bob = scope(t, "bob@example.com").await;
    let own = t.db.safety_rules().create(&alice, rule("alice word")).await.unwrap();
    assert_eq!(own.owner, Owner::User(alice.user_id().to_owned()));
    assert_eq!(t.db.safety_rules().applicable(&alice).await.unwrap(), vec![own.clone()]);
    assert!(t.db.safety_rules().applicable(&bob).await.unwrap().is_empty(), "TEN-1: bob sees none of alice's rules");
    assert!(matches!(t.db.safety_rules().get(&bob, &own.id).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(t.db.safety_rules().delete(&bob, &own.id).await, Err(StoreError::NotFound { .. })));

    // An organisation's rule applies to its members; a plain member cannot delete it.
    let org = t.db.orgs().create("acme", "ACME", alice.user_id()).await.unwrap();
    t.db.orgs().add_member(&org.id, bob.user_id(), OrgRole::Member).await.unwrap();
    let as_org = TenantScope::resolve(&t.db, alice.user_id(), Some(Owner::Org(org.id.clone()))).await.unwrap();
    let shared = t.db.safety_rules().create(&as_org, rule("org word")).await.unwrap();
    assert_eq!(t.db.safety_rules().applicable(&bob).await.unwrap(), vec![shared.clone()]);
    assert_eq!(t.db.safety_rules().applicable(&alice).await.unwrap().len(), 2);
    assert!(matches!(t.db.safety_rules().delete(&bob, &shared.id).await, Err(StoreError::Forbidden(_))));
    assert_eq!(
        t.db.safety_rules().applicable(&bob).await.unwrap(),
        vec![shared.clone()],
        "a refused delete changes nothing"
    );
    assert_eq!(t.db.safety_rules().delete(&alice, &shared.id).await.unwrap(), shared);
    assert!(t.db.safety_rules().applicable(&bob).await.unwrap().is_empty());
}

async fn bad_rules_are_refused_and_change_nothing(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    for bad in [rule(""), rule(&"x".repeat(1025)), NewRule { reason: "r".repeat(501), ..rule("fine") }] {
        let result = t.db.safety_rules().create(&alice, bad).await;
        assert!(matches!(result, Err(StoreError::InvalidInput(_))), "{result:?}");
    }
    assert!(t.db.safety_rules().applicable(&alice).await.unwrap().is_empty());
}

async fn the_local_user_is_made_once(t: &TestDb) {
    assert_eq!(t.db.users().ensure_local().await.unwrap(), LOCAL_USER_ID);
    assert_eq!(t.db.users().ensure_local().await.unwrap(), LOCAL_USER_ID);
    let local = t.db.users().get(LOCAL_USER_ID).await.unwrap();
    assert_eq!((local.role, local.status.as_str()), (Role::Admin, "active"));
    assert_eq!(t.db.users().count().await.unwrap(), 1);
    TenantScope::resolve(&t.db, LOCAL_USER_ID, None).await.expect("the local user acts for itself");
}
