//! The fine-tuning jobs repository against real SQLite and real PostgreSQL: tenant scoping,
//! cancellation rules, leases, progress and endings only by the lease holder, a cancelled
//! job that a trainer cannot finish, numbered events, and the GPU seconds a quota counts.

mod common;

use common::{TestDb, scope};
use maas_store::repo::fine_tuning::{JobStatus, NewJob, Progress};
use maas_store::repo::usage::{NewUsage, UsageKind};
use maas_store::{Owner, StoreError};
use serde_json::json;

on_both_backends!(
    jobs_belong_to_their_tenant_and_list_newest_first,
    only_the_lease_holder_records_progress_and_finishes,
    a_cancelled_job_stays_cancelled,
    events_are_numbered_in_order,
    gpu_seconds_are_counted_per_subject_since_a_time,
);

fn new_job(steps: u64) -> NewJob {
    NewJob {
        model: "tiny:v1".into(),
        training_file: "file-x".into(),
        validation_file: None,
        settings: json!({"n_epochs": 3}),
        suffix: Some("facts".into()),
        total_steps: steps,
    }
}

async fn jobs_belong_to_their_tenant_and_list_newest_first(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let bob = scope(t, "bob@example.com").await;
    let jobs = t.db.fine_tuning_jobs();
    let first = jobs.create(&alice, new_job(6)).await.unwrap();
    let second = jobs.create(&alice, new_job(9)).await.unwrap();
    assert_eq!((first.status, first.total_steps, first.steps_done), (JobStatus::Queued, 6, 0));
    assert_eq!(first.settings, json!({"n_epochs": 3}));
    let listed = jobs.list(&alice, 10, None).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [&second.id, &first.id]);
    let after = jobs.list(&alice, 10, Some(&second.id)).await.unwrap();
    assert_eq!(after.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [&first.id]);

    // TEN-1: another tenant neither lists, reads, cancels nor reads the events.
    assert!(jobs.list(&bob, 10, None).await.unwrap().is_empty());
    assert!(matches!(jobs.get(&bob, &first.id).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(jobs.cancel(&bob, &first.id).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(jobs.events(&bob, &first.id, 0, 10).await, Err(StoreError::NotFound { .. })));
    assert_eq!(jobs.get(&alice, &first.id).await.unwrap().status, JobStatus::Queued);
    assert_eq!(jobs.scope_of(&first).await.unwrap(), alice);
}

async fn only_the_lease_holder_records_progress_and_finishes(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let jobs = t.db.fine_tuning_jobs();
    let job = jobs.create(&alice, new_job(20)).await.unwrap();
    assert_eq!(jobs.claim("node-1", 1_000, 31_000).await.unwrap().as_deref(), Some(job.id.as_str()));
    assert_eq!(jobs.claim("node-2", 2_000, 32_000).await.unwrap(), None, "node-1 holds the lease");
    assert!(jobs.mark_running(&job.id, "node-1", "gpu-box", 1).await.unwrap());
    let progress = Progress { steps_done: 10, trained_tokens: 400, checkpoint_sha256: Some("a".repeat(64)) };
    assert!(jobs.record_progress(&job.id, "node-1", &progress).await.unwrap());
    assert!(!jobs.record_progress(&job.id, "node-2", &progress).await.unwrap(), "not node-2's job");
    jobs.add_gpu_ms(&job.id, 2_500).await.unwrap();
    let running = jobs.get(&alice, &job.id).await.unwrap();
    assert_eq!((running.status, running.steps_done, running.trained_tokens), (JobStatus::Running, 10, 400));
    assert_eq!((running.gpus, running.gpu_ms, running.node.as_deref()), (1, 2_500, Some("gpu-box")));
    assert_eq!(running.checkpoint_sha256, Some("a".repeat(64)));

    // node-1 dies; node-2 takes the job over from its checkpoint.
    assert_eq!(jobs.claim("node-2", 31_001, 61_001).await.unwrap().as_deref(), Some(job.id.as_str()));
    assert!(!jobs.renew(&job.id, "node-1", 90_000).await.unwrap(), "node-1 learns it lost the lease");
    assert!(!jobs.finish(&job.id, "node-1", JobStatus::Succeeded, Some("x:y"), None).await.unwrap());
    let resumed = jobs.get_any(&job.id).await.unwrap();
    assert_eq!((resumed.steps_done, resumed.started_at_ms), (10, running.started_at_ms));
    assert!(jobs.finish(&job.id, "node-2", JobStatus::Succeeded, Some("tiny-facts:v9"), None).await.unwrap());
    let done = jobs.get(&alice, &job.id).await.unwrap();
    assert_eq!((done.status, done.fine_tuned_model.as_deref()), (JobStatus::Succeeded, Some("tiny-facts:v9")));
    assert!(done.finished_at_ms.is_some());
    assert_eq!(jobs.claim("node-3", 100_000, 130_000).await.unwrap(), None, "an ended job is not claimed");
    assert!(jobs.finish(&job.id, "node-2", JobStatus::Cancelled, None, None).await.is_err());
    let refused = jobs.cancel(&alice, &job.id).await;
    assert!(matches!(&refused, Err(StoreError::Conflict(message)) if message.contains("succeeded")), "{refused:?}");
}

async fn a_cancelled_job_stays_cancelled(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let jobs = t.db.fine_tuning_jobs();
    let job = jobs.create(&alice, new_job(5)).await.unwrap();
    jobs.claim("node-1", 1_000, 31_000).await.unwrap();
    let cancelled = jobs.cancel(&alice, &job.id).await.unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert_eq!(jobs.cancel(&alice, &job.id).await.unwrap().status, JobStatus::Cancelled, "idempotent");
    // The trainer had not noticed: it can neither record progress nor finish the job.
    assert!(!jobs.renew(&job.id, "node-1", 40_000).await.unwrap());
    let progress = Progress { steps_done: 5, trained_tokens: 1, checkpoint_sha256: None };
    assert!(!jobs.record_progress(&job.id, "node-1", &progress).await.unwrap());
    let error = json!({"code": "training_failed", "message": "late"});
    assert!(!jobs.finish(&job.id, "node-1", JobStatus::Failed, None, Some(&error)).await.unwrap());
    assert_eq!(jobs.get(&alice, &job.id).await.unwrap().status, JobStatus::Cancelled);
}

async fn events_are_numbered_in_order(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let jobs = t.db.fine_tuning_jobs();
    let job = jobs.create(&alice, new_job(2)).await.unwrap();
    for step in 1..=2 {
        let data = json!({"step": step, "train_loss": 3.0 / f64::from(step)});
        jobs.add_event(&job.id, "info", &format!("Step {step}/2"), Some(&data)).await.unwrap();
    }
    let events = jobs.events(&alice, &job.id, 0, 10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(events[0].message.starts_with("Created fine-tuning job"));
    assert_eq!(events[2].data, Some(json!({"step": 2, "train_loss": 1.5})));
    let later = jobs.events(&alice, &job.id, 2, 10).await.unwrap();
    assert_eq!(later.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    let reopened = t.reopen().await;
    assert_eq!(reopened.fine_tuning_jobs().events(&alice, &job.id, 0, 1).await.unwrap().len(), 1);
}

async fn gpu_seconds_are_counted_per_subject_since_a_time(t: &TestDb) {
    let alice = scope(t, "alice@example.com").await;
    let user = alice.user_id().to_owned();
    let record = |gpu_seconds: u64, key_id: Option<&str>, at_ms: i64| NewUsage {
        owner: Owner::User(user.clone()),
        user_id: user.clone(),
        key_id: key_id.map(str::to_owned),
        kind: UsageKind::Training,
        model: "tiny".into(),
        endpoint: "fine_tuning".into(),
        prompt_tokens: 0,
        completion_tokens: 0,
        gpu_seconds,
        storage_bytes: 0,
        latency_ms: 0,
        status: 200,
        at_ms,
    };
    let usage = t.db.usage();
    usage
        .record_many(&[record(100, None, 1_000), record(30, Some("key_1"), 5_000), record(7, None, 9_000)])
        .await
        .unwrap();
    assert_eq!(usage.gpu_seconds_since(&format!("user:{user}"), 0).await.unwrap(), 137);
    assert_eq!(usage.gpu_seconds_since(&format!("user:{user}"), 5_000).await.unwrap(), 37);
    assert_eq!(usage.gpu_seconds_since("key:key_1", 0).await.unwrap(), 30);
    assert_eq!(usage.gpu_seconds_since("org:nobody", 0).await.unwrap(), 0);
    assert!(usage.gpu_seconds_since("team:x", 0).await.is_err());
}
