//! The Files and Batch APIs over HTTP against a real store and a one-node control plane:
//! uploads as the OpenAI SDKs send them (multipart), batch files checked line by line,
//! bad input refused with a clear 4xx that changes nothing, and the worker running a
//! batch whose lines fail one by one (an unknown model is a line's error, not the
//! batch's) and a batch cancelled before it started.

use std::sync::Arc;
use std::time::{Duration, Instant};

use maas_consensus::control::NoPeers;
use maas_consensus::state::ClusterState;
use maas_consensus::storage::DiskStorage;
use maas_consensus::{DriverConfig, RaftHandle};
use maas_gateway::{AppState, GatewayOptions, HttpServer, ServeOptions};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The upload limit of these tests' server.
const UPLOAD_LIMIT: u64 = 64 * 1024;

struct Setup {
    base: String,
    state: Arc<AppState>,
    _control: RaftHandle<ClusterState>,
    _dir: tempfile::TempDir,
    _serving: maas_gateway::ShutdownTrigger,
}

async fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config =
        DriverConfig { tick: Duration::from_millis(10), bootstrap_voters: Some(vec![1]), ..DriverConfig::new(1) };
    let control = maas_consensus::driver::start(
        &config,
        DiskStorage::open(&dir.path().join("raft")).unwrap(),
        ClusterState::default(),
        Arc::new(NoPeers),
    )
    .unwrap();
    control.campaign();
    let state = Arc::new(AppState::new(
        "test-node",
        GatewayOptions { max_body_bytes: 16 * 1024, debug_routes: false, ..GatewayOptions::default() },
    ));
    let db =
        maas_store::Db::connect(&maas_store::DbOptions::new(maas_store::db::sqlite_url_in(dir.path()))).await.unwrap();
    db.migrate().await.unwrap();
    let blobs = maas_store::BlobStore::open(dir.path().join("blobs")).await.unwrap();
    let _ = state.stores.set(maas_gateway::state::Stores { db, blobs, data_dir: dir.path().to_owned() });
    let _ = state.cluster.set(control.clone());
    let _ = state.cluster_cookie.set(COOKIE.to_owned());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 16 * 1024,
            max_upload_bytes: UPLOAD_LIMIT,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    Setup { base, state, _control: control, _dir: dir, _serving: trigger }
}

/// The cluster cookie: the tests act as the node's built-in administrator.
const COOKIE: &str = "batches-test-cookie";

fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-maas-cluster-cookie", reqwest::header::HeaderValue::from_static(COOKIE));
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

const BOUNDARY: &str = "maas-test-boundary-7d1f";

/// A multipart form as the OpenAI SDK sends it: text fields, then the file.
fn form(purpose: Option<&str>, file: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    if let Some(purpose) = purpose {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n").as_bytes(),
        );
    }
    if let Some(file) = file {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
                 content-type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(file);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload(setup: &Setup, body: Vec<u8>) -> (u16, Value) {
    let response = client()
        .post(format!("{}/v1/files", setup.base))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn call(setup: &Setup, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client().request(method, format!("{}{path}", setup.base));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn request_line(custom_id: &str, url: &str, model: &str) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url,
           "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}})
    .to_string()
}

fn jsonl(lines: &[String]) -> Vec<u8> {
    lines.join("\n").into_bytes()
}

/// Asserts OpenAI's error shape and that the message mentions `mention`.
fn assert_error(status: u16, body: &Value, want_status: u16, mention: &str) {
    assert_eq!(status, want_status, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(body["error"]["type"].is_string(), "OpenAI's error shape: {body}");
    assert!(message.contains(mention), "{message:?} should mention {mention:?}");
}

async fn file_count(setup: &Setup) -> usize {
    call(setup, reqwest::Method::GET, "/v1/files", None).await.1["data"].as_array().unwrap().len()
}

#[tokio::test]
async fn bad_uploads_get_a_clear_4xx_and_store_nothing() {
    let setup = start().await;
    let good = request_line("a", "/v1/chat/completions", "m");

    let not_multipart =
        client().post(format!("{}/v1/files", setup.base)).json(&json!({"purpose": "batch"})).send().await.unwrap();
    assert_eq!(not_multipart.status(), 400);
    let body: Value = not_multipart.json().await.unwrap();
    assert_error(400, &body, 400, "multipart/form-data");

    let cases: Vec<(Vec<u8>, u16, &str, Option<&str>)> = vec![
        (form(None, Some(good.as_bytes())), 400, "no `purpose` field", Some("purpose")),
        (form(Some("batch"), None), 400, "no `file` field", Some("file")),
        (form(Some("homework"), Some(good.as_bytes())), 400, "purpose `homework` is not one of", Some("purpose")),
        (
            form(Some("batch"), Some(&jsonl(&[good.clone(), "{\"custom_id\": ".into()]))),
            400,
            "line 2: not valid JSON",
            Some("file"),
        ),
        (
            form(Some("batch"), Some(&jsonl(&[good.clone(), String::new(), good.clone()]))),
            400,
            "line 3: custom_id \"a\" is already used on line 1",
            Some("file"),
        ),
        (
            form(Some("batch"), Some(&jsonl(&[request_line("a", "/v1/moderations", "m")]))),
            400,
            "line 1: url \"/v1/moderations\" is not one of",
            Some("file"),
        ),
        (form(Some("batch"), Some(b"")), 400, "holds no requests", Some("file")),
        (form(Some("batch"), Some(&[0xff, 0xfe, b'\n'])), 400, "line 1", Some("file")),
    ];
    for (body, status, mention, param) in cases {
        let (got, answer) = upload(&setup, body).await;
        assert_error(got, &answer, status, mention);
        assert_eq!(answer["error"]["param"].as_str(), param, "{answer}");
    }

    // Too large, declared up front and streamed without a length: 413 naming the limit.
    let big = form(Some("user_data"), Some(&vec![b'x'; usize::try_from(UPLOAD_LIMIT).unwrap() + 1]));
    let (status, answer) = upload(&setup, big.clone()).await;
    assert_error(status, &answer, 413, &UPLOAD_LIMIT.to_string());
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let streamed = client()
        .post(format!("{}/v1/files", setup.base))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    let answer: Value = streamed.json().await.unwrap();
    assert_error(413, &answer, 413, &UPLOAD_LIMIT.to_string());

    assert_eq!(file_count(&setup).await, 0, "a refused upload records no file");
}

#[tokio::test]
async fn files_are_uploaded_listed_read_downloaded_and_deleted() {
    let setup = start().await;
    let content =
        jsonl(&[request_line("a", "/v1/chat/completions", "m"), request_line("b", "/v1/chat/completions", "m")]);
    let (status, file) = upload(&setup, form(Some("batch"), Some(&content))).await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["filename"], "input.jsonl");
    assert_eq!(file["status"], "processed");
    assert_eq!(file["bytes"].as_u64(), Some(content.len() as u64));
    assert!(file["created_at"].as_i64().unwrap() > 1_600_000_000, "seconds: {file}");
    let id = file["id"].as_str().unwrap();

    let (status, other) = upload(&setup, form(Some("user_data"), Some(b"not json at all"))).await;
    assert_eq!(status, 200, "only batch files are checked as JSONL: {other}");

    let (status, list) = call(&setup, reqwest::Method::GET, "/v1/files", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let (status, got) = call(&setup, reqwest::Method::GET, &format!("/v1/files/{id}"), None).await;
    assert_eq!((status, &got), (200, &file));
    let downloaded = client().get(format!("{}/v1/files/{id}/content", setup.base)).send().await.unwrap();
    assert_eq!(downloaded.status(), 200);
    assert_eq!(downloaded.bytes().await.unwrap().as_ref(), content.as_slice());

    let (status, deleted) = call(&setup, reqwest::Method::DELETE, &format!("/v1/files/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(deleted, json!({"id": id, "object": "file", "deleted": true}));
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/files/{id}")),
        (reqwest::Method::GET, format!("/v1/files/{id}/content")),
        (reqwest::Method::DELETE, format!("/v1/files/{id}")),
        (reqwest::Method::GET, "/v1/files/file-nope".to_owned()),
    ] {
        let (status, answer) = call(&setup, method, &path, None).await;
        assert_error(status, &answer, 404, "not found");
    }
    assert_eq!(file_count(&setup).await, 1);
}

#[tokio::test]
async fn bad_batch_requests_get_a_clear_4xx_and_create_nothing() {
    let setup = start().await;
    let chat = "/v1/chat/completions";
    let content = jsonl(&[request_line("a", chat, "m"), request_line("b", "/v1/completions", "m")]);
    let (_, mixed) = upload(&setup, form(Some("batch"), Some(&content))).await;
    let (_, data) = upload(&setup, form(Some("user_data"), Some(b"x"))).await;
    let batch = |file: &Value, endpoint: &str| json!({"input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h"});
    let cases = [
        (batch(&mixed, chat), 400, "line 2: url \"/v1/completions\" differs from the batch's endpoint"),
        (json!({"input_file_id": "file-nope", "endpoint": chat, "completion_window": "24h"}), 404, "file-nope"),
        (batch(&data, chat), 400, "purpose `user_data`"),
        (batch(&mixed, "/v1/images"), 400, "endpoint \"/v1/images\" is not one of"),
        (json!({"input_file_id": mixed["id"], "endpoint": chat, "completion_window": "1h"}), 400, "use \"24h\""),
        (json!({"input_file_id": mixed["id"], "endpoint": chat}), 400, "completion_window"),
        (
            json!({"input_file_id": mixed["id"], "endpoint": chat, "completion_window": "24h", "colour": 1}),
            400,
            "colour",
        ),
        (
            json!({"input_file_id": mixed["id"], "endpoint": chat, "completion_window": "24h", "metadata": {"k": 1}}),
            400,
            "must be a string",
        ),
    ];
    for (body, status, mention) in cases {
        let (got, answer) = call(&setup, reqwest::Method::POST, "/v1/batches", Some(body)).await;
        assert_error(got, &answer, status, mention);
    }
    let (status, answer) = call(&setup, reqwest::Method::GET, "/v1/batches/batch-nope", None).await;
    assert_error(status, &answer, 404, "batch-nope");
    let (status, answer) = call(&setup, reqwest::Method::POST, "/v1/batches/batch-nope/cancel", None).await;
    assert_error(status, &answer, 404, "batch-nope");
    let (status, answer) = call(&setup, reqwest::Method::GET, "/v1/batches?limit=0", None).await;
    assert_error(status, &answer, 400, "limit");
    let (status, list) = call(&setup, reqwest::Method::GET, "/v1/batches", None).await;
    assert_eq!(status, 200);
    assert_eq!(list, json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false}));
}

async fn wait_for_status(setup: &Setup, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, batch) = call(setup, reqwest::Method::GET, &format!("/v1/batches/{id}"), None).await;
        assert_eq!(status, 200, "{batch}");
        if batch["status"] == want {
            return batch;
        }
        assert!(Instant::now() < deadline, "batch {id} is still {}, not {want}: {batch}", batch["status"]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn lines_fail_one_by_one_and_a_cancelled_batch_ends_cancelled() {
    let setup = start().await;
    let chat = "/v1/chat/completions";
    let lines: Vec<String> = (0..3).map(|i| request_line(&format!("line-{i}"), chat, "no-such-model")).collect();
    let (_, file) = upload(&setup, form(Some("batch"), Some(&jsonl(&lines)))).await;
    let create =
        json!({"input_file_id": file["id"], "endpoint": chat, "completion_window": "24h", "metadata": {"run": "test"}});

    // Created before any worker runs: validating; cancelled at once.
    let (status, early) = call(&setup, reqwest::Method::POST, "/v1/batches", Some(create.clone())).await;
    assert_eq!(status, 200, "{early}");
    assert_eq!(early["object"], "batch");
    assert_eq!(early["status"], "validating");
    assert_eq!(early["request_counts"], json!({"total": 3, "completed": 0, "failed": 0}));
    assert_eq!(early["metadata"], json!({"run": "test"}));
    let early_id = early["id"].as_str().unwrap();
    let (status, cancelling) =
        call(&setup, reqwest::Method::POST, &format!("/v1/batches/{early_id}/cancel"), None).await;
    assert_eq!((status, cancelling["status"].as_str()), (200, Some("cancelling")), "{cancelling}");

    let (status, batch) = call(&setup, reqwest::Method::POST, "/v1/batches", Some(create)).await;
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap();
    let (_, list) = call(&setup, reqwest::Method::GET, "/v1/batches?limit=1", None).await;
    assert_eq!((list["data"][0]["id"].as_str(), list["has_more"].as_bool()), (Some(id), Some(true)), "newest first");

    maas_gateway::routes::batches::spawn_worker(Arc::clone(&setup.state), "node-test".into());
    let cancelled = wait_for_status(&setup, early_id, "cancelled").await;
    assert_eq!(cancelled["request_counts"], json!({"total": 3, "completed": 0, "failed": 0}));
    assert!(cancelled["output_file_id"].is_null() && cancelled["cancelled_at"].is_i64(), "{cancelled}");

    // An unknown model is each line's error; the batch itself completes.
    let done = wait_for_status(&setup, id, "completed").await;
    assert_eq!(done["request_counts"], json!({"total": 3, "completed": 0, "failed": 3}));
    assert!(done["output_file_id"].is_null(), "no line succeeded: {done}");
    let error_file = done["error_file_id"].as_str().unwrap();
    let (_, error_record) = call(&setup, reqwest::Method::GET, &format!("/v1/files/{error_file}"), None).await;
    assert_eq!(error_record["purpose"], "batch_output");
    let errors = client()
        .get(format!("{}/v1/files/{error_file}/content", setup.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let errors: Vec<Value> = errors.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        errors.iter().map(|e| e["custom_id"].as_str().unwrap()).collect::<Vec<_>>(),
        ["line-0", "line-1", "line-2"]
    );
    for error in &errors {
        assert_eq!(error["error"]["code"], "model_not_found", "{error}");
        assert_eq!(error["response"]["status_code"], 404, "{error}");
        assert!(error["id"].as_str().unwrap().starts_with("batch_req_"), "{error}");
    }

    let (status, answer) = call(&setup, reqwest::Method::POST, &format!("/v1/batches/{id}/cancel"), None).await;
    assert_error(status, &answer, 409, "completed");
}
