//! The batches repository against real SQLite and real PostgreSQL: tenant scoping,
//! cancellation rules, leases that one worker holds at a time and that pass on when they
//! expire, and line results that are recorded at most once.

mod common;

use common::{TestDb, scope};
use maas_store::StoreError;
use maas_store::repo::batches::{BatchStatus, LineResult, NewBatch};
use serde_json::json;

on_both_backends!(
    batches_belong_to_their_tenant_and_list_newest_first,
    cancelling_follows_the_batch_status,
    one_worker_holds_a_lease_until_it_expires,
    a_line_is_answered_at_most_once,
    finishing_sets_the_output_and_ends_the_lease,
);

fn new_batch(total_lines: u64) -> NewBatch {
    NewBatch {
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-x".into(),
        completion_window: "24h".into(),
        window_ms: 24 * 3_600_000,
        metadata: Some(json!({"job": "nightly"})),
        total_lines,
    }
}

fn answer(line_index: u64, error: bool) -> LineResult {
    LineResult {
        line_index,
        custom_id: format!("c{line_index}"),
        status_code: if error { 404 } else { 200 },
        request_id: format!("req_{line_index}"),
        response: Some(json!({"line": line_index})),
        error: error.then(|| ("model_not_found".to_owned(), "no such model".to_owned())),
    }
}

async fn batches_belong_to_their_tenant_and_list_newest_first(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let bob = scope(t, "bob@example.com").await;
    let first = t.db.batches().create(&alice, new_batch(3)).await.unwrap();
    let second = t.db.batches().create(&alice, new_batch(5)).await.unwrap();
    assert_eq!(first.status, BatchStatus::Validating);
    assert_eq!((first.total_lines, first.completed_lines, first.failed_lines), (3, 0, 0));
    assert_eq!(first.metadata, Some(json!({"job": "nightly"})));
    assert!(first.expires_at_ms - first.created_at_ms == 24 * 3_600_000);

    let listed = t.db.batches().list(&alice, 10, None).await.unwrap();
    assert_eq!(listed.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), [&second.id, &first.id]);
    let page = t.db.batches().list(&alice, 1, None).await.unwrap();
    assert_eq!(page.len(), 1);
    let after = t.db.batches().list(&alice, 10, Some(&page[0].id)).await.unwrap();
    assert_eq!(after.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), [&first.id]);

    // TEN-1: another tenant neither lists, reads nor cancels them.
    assert!(t.db.batches().list(&bob, 10, None).await.unwrap().is_empty());
    assert!(matches!(t.db.batches().get(&bob, &first.id).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(t.db.batches().cancel(&bob, &first.id).await, Err(StoreError::NotFound { .. })));
    assert_eq!(t.db.batches().get(&alice, &first.id).await.unwrap().status, BatchStatus::Validating);
}

async fn cancelling_follows_the_batch_status(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let running = t.db.batches().create(&alice, new_batch(2)).await.unwrap();
    let cancelling = t.db.batches().cancel(&alice, &running.id).await.unwrap();
    assert_eq!(cancelling.status, BatchStatus::Cancelling);
    assert!(cancelling.cancelling_at_ms.is_some());
    assert_eq!(t.db.batches().cancel(&alice, &running.id).await.unwrap().status, BatchStatus::Cancelling, "idempotent");

    let done = t.db.batches().create(&alice, new_batch(1)).await.unwrap();
    t.db.batches().finish(&done.id, BatchStatus::Completed, Some("file-out"), None, None).await.unwrap();
    let refused = t.db.batches().cancel(&alice, &done.id).await;
    assert!(matches!(&refused, Err(StoreError::Conflict(message)) if message.contains("completed")), "{refused:?}");
    assert_eq!(t.db.batches().get(&alice, &done.id).await.unwrap().status, BatchStatus::Completed);
    assert!(matches!(t.db.batches().cancel(&alice, "batch-missing").await, Err(StoreError::NotFound { .. })));
}

async fn one_worker_holds_a_lease_until_it_expires(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let batch = t.db.batches().create(&alice, new_batch(1)).await.unwrap();
    let batches = t.db.batches();
    assert_eq!(batches.claim("node-1", 1_000, 31_000).await.unwrap().as_deref(), Some(batch.id.as_str()));
    assert_eq!(batches.claim("node-2", 2_000, 32_000).await.unwrap(), None, "node-1 holds the lease");
    assert_eq!(
        batches.claim("node-1", 2_000, 32_000).await.unwrap().as_deref(),
        Some(batch.id.as_str()),
        "a restarted node takes its own batch back"
    );
    assert!(batches.renew(&batch.id, "node-1", 40_000).await.unwrap());
    assert_eq!(batches.claim("node-2", 39_999, 70_000).await.unwrap(), None);
    // node-1 dies: its lease runs out and node-2 takes the batch over.
    assert_eq!(batches.claim("node-2", 40_001, 70_001).await.unwrap().as_deref(), Some(batch.id.as_str()));
    assert!(!batches.renew(&batch.id, "node-1", 80_000).await.unwrap(), "node-1 learns it lost the lease");
    batches.release(&batch.id, "node-2").await.unwrap();
    assert_eq!(batches.claim("node-3", 40_002, 70_002).await.unwrap().as_deref(), Some(batch.id.as_str()));
}

async fn a_line_is_answered_at_most_once(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let batch = t.db.batches().create(&alice, new_batch(3)).await.unwrap();
    let batches = t.db.batches();
    assert!(batches.record_result(&batch.id, &answer(2, false)).await.unwrap());
    assert!(batches.record_result(&batch.id, &answer(0, true)).await.unwrap());
    assert!(!batches.record_result(&batch.id, &answer(2, true)).await.unwrap(), "the first answer stays");
    assert_eq!(batches.answered_lines(&batch.id).await.unwrap(), [0, 2]);
    let results = batches.results(&batch.id).await.unwrap();
    assert_eq!(results, [answer(0, true), answer(2, false)]);

    let reopened = t.reopen().await;
    let counted = reopened.batches().get(&alice, &batch.id).await.unwrap();
    assert_eq!((counted.total_lines, counted.completed_lines, counted.failed_lines), (3, 1, 1));
}

async fn finishing_sets_the_output_and_ends_the_lease(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let batch = t.db.batches().create(&alice, new_batch(1)).await.unwrap();
    let batches = t.db.batches();
    batches.claim("node-1", 1_000, 31_000).await.unwrap();
    batches.mark_in_progress(&batch.id).await.unwrap();
    assert_eq!(batches.get_any(&batch.id).await.unwrap().status, BatchStatus::InProgress);
    batches.mark_finalizing(&batch.id).await.unwrap();
    batches.finish(&batch.id, BatchStatus::Completed, Some("file-out"), Some("file-err"), None).await.unwrap();
    let done = batches.get(&alice, &batch.id).await.unwrap();
    assert_eq!(done.status, BatchStatus::Completed);
    assert_eq!(done.output_file_id.as_deref(), Some("file-out"));
    assert_eq!(done.error_file_id.as_deref(), Some("file-err"));
    assert!(done.in_progress_at_ms.is_some() && done.finalizing_at_ms.is_some() && done.completed_at_ms.is_some());
    assert_eq!(batches.claim("node-1", 2_000, 32_000).await.unwrap(), None, "a finished batch is not claimed");
    assert_eq!(batches.scope_of(&done).await.unwrap(), alice);

    let failed = batches.create(&alice, new_batch(1)).await.unwrap();
    let errors = json!([{"code": "invalid_input_file", "message": "gone", "line": null, "param": null}]);
    batches.finish(&failed.id, BatchStatus::Failed, None, None, Some(&errors)).await.unwrap();
    let failed = batches.get(&alice, &failed.id).await.unwrap();
    assert_eq!((failed.status, failed.errors), (BatchStatus::Failed, Some(errors)));
    assert!(batches.finish(&failed.id, BatchStatus::InProgress, None, None, None).await.is_err());
}
