//! The gateway over real sockets: health, readiness, metrics, errors, limits, request
//! ids, the OpenAPI document, and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use maas_gateway::{AppState, Check, GatewayOptions, HttpServer, ServeOptions, ShutdownOutcome, ShutdownTrigger};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

struct TestServer {
    base: String,
    state: Arc<AppState>,
    trigger: ShutdownTrigger,
    in_flight: Arc<AtomicUsize>,
    run: JoinHandle<ShutdownOutcome>,
}

async fn start(max_body_bytes: u64, drain_timeout: Duration) -> TestServer {
    let state = Arc::new(AppState::new(
        "test-node",
        GatewayOptions { max_body_bytes, debug_routes: true, ..GatewayOptions::default() },
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes,
            max_upload_bytes: 0,
            drain_timeout,
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let in_flight = server.in_flight();
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    let run = tokio::spawn(server.run(shutdown));
    TestServer { base, state, trigger, in_flight, run }
}

async fn default_server() -> TestServer {
    start(64 * 1024, Duration::from_secs(10)).await
}

/// Waits (bounded) until `condition` holds; the server's state is the event.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn assert_openai_error(body: &Value, code: &str) {
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(error["type"].as_str().is_some(), "{body}");
    assert_eq!(error["code"], code, "{body}");
}

#[tokio::test]
async fn healthz_answers_with_a_request_id() {
    let server = default_server().await;
    let client = reqwest::Client::new();
    let response = client.get(format!("{}/healthz", server.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let generated = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["node"], "test-node");

    let echoed =
        client.get(format!("{}/healthz", server.base)).header("x-request-id", "trace-abc-123").send().await.unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-abc-123");
    let replaced =
        client.get(format!("{}/nope", server.base)).header("x-request-id", "bad id with spaces").send().await.unwrap();
    assert_ne!(replaced.headers()["x-request-id"], "bad id with spaces");
}

#[tokio::test]
async fn readyz_waits_for_every_check() {
    let server = default_server().await;
    let url = format!("{}/readyz", server.base);
    server.state.readiness.set("store", Check::Pending("migrating the database".into()));
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(body["checks"]["store"], "pending: migrating the database");

    server.state.readiness.set("store", Check::Ready);
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["ready"], true);
}

fn counter(metrics: &str, method: &str, route: &str, status: u16) -> u64 {
    let prefix = format!("maas_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} ");
    metrics.lines().find_map(|line| line.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn metrics_count_requests_per_route_and_status() {
    let server = default_server().await;
    let before = reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap();
    for _ in 0..3 {
        reqwest::get(format!("{}/healthz", server.base)).await.unwrap();
    }
    reqwest::get(format!("{}/no/such/route", server.base)).await.unwrap();
    let response = reqwest::get(format!("{}/metrics", server.base)).await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let after = response.text().await.unwrap();
    assert_eq!(counter(&after, "GET", "/healthz", 200) - counter(&before, "GET", "/healthz", 200), 3, "{after}");
    assert_eq!(counter(&after, "GET", "unmatched", 404) - counter(&before, "GET", "unmatched", 404), 1, "{after}");
    assert!(
        after.contains(
            "maas_http_request_duration_seconds_bucket{method=\"GET\",route=\"/healthz\",status=\"200\",le=\"0.005\"}"
        ),
        "{after}"
    );
    assert!(after.contains("maas_http_requests_in_flight"), "{after}");
}

#[tokio::test]
async fn errors_have_the_openai_shape() {
    let server = default_server().await;
    let client = reqwest::Client::new();
    let table: [(reqwest::Method, &str, u16, &str); 6] = [
        (reqwest::Method::GET, "/v1/nothing-here", 404, "unknown_route"),
        (reqwest::Method::DELETE, "/healthz", 405, "method_not_allowed"),
        (reqwest::Method::GET, "/debug/delay?ms=abc", 400, "invalid_query"),
        (reqwest::Method::GET, "/debug/delay?ms=999999", 400, "invalid_query"),
        (reqwest::Method::GET, "/v1/cluster/status", 503, "unavailable"),
        (reqwest::Method::GET, "/v1/nodes", 503, "unavailable"),
    ];
    for (method, path, status, code) in table {
        let response = client.request(method.clone(), format!("{}{path}", server.base)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(response.headers()["content-type"], "application/json", "{method} {path}");
        assert!(response.headers().get("strict-transport-security").is_none(), "no HSTS over plain HTTP");
        assert_openai_error(&response.json().await.unwrap(), code);
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let server = start(1024, Duration::from_secs(10)).await;
    let client = reqwest::Client::new();
    // Declared too large.
    let response = client.post(format!("{}/healthz", server.base)).body(vec![b'x'; 4096]).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_openai_error(&response.json().await.unwrap(), "payload_too_large");
    // Streamed without a content-length: the limit holds as the body arrives.
    let chunked = |chunks: usize| {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..chunks).map(|_| Ok(vec![b'y'; 256])).collect();
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
    };
    let response = client.post(format!("{}/debug/echo", server.base)).body(chunked(8)).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_openai_error(&response.json().await.unwrap(), "payload_too_large");
    let response = client.post(format!("{}/debug/echo", server.base)).body(chunked(4)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["received_bytes"], 1024);
}

#[tokio::test]
async fn the_openapi_document_is_valid_and_lists_every_route() {
    let server = default_server().await;
    let text = reqwest::get(format!("{}/openapi.json", server.base)).await.unwrap().text().await.unwrap();
    let spec = oas3::from_json(&text).expect("a valid OpenAPI 3.1 document");
    assert!(spec.openapi.starts_with("3."), "{}", spec.openapi);
    let documented = maas_gateway::routes::openapi::documented_routes();
    for path in ["/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/debug/delay", "/debug/echo"] {
        assert!(documented.iter().any(|(_, p)| p == path), "{path} is documented");
    }
    // Every documented GET route is served (none falls through to the unknown-route 404).
    let client = reqwest::Client::new();
    for (method, path) in documented {
        // Path parameters get a sample value (ids are numbers).
        let filled: String = path
            .split('/')
            .map(|segment| if segment.starts_with('{') { "1" } else { segment })
            .collect::<Vec<_>>()
            .join("/");
        let url = format!("{}{filled}", server.base);

        let url = if path == "/debug/delay" { format!("{url}?ms=0") } else { url };
        let response = client.request(method.clone(), url).send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(!body.contains("unknown_route"), "{method} {path} is documented but not served: {status} {body}");
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    let server = default_server().await;
    let slow = tokio::spawn(reqwest::get(format!("{}/debug/delay?ms=800", server.base)));
    until("the slow request is in flight", || server.in_flight.load(Ordering::SeqCst) == 1).await;
    server.trigger.request();
    until("the listener is closed", || {
        std::net::TcpStream::connect(server.base.trim_start_matches("http://")).is_err()
    })
    .await;
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the in-flight request finished");
    assert_eq!(response.json::<Value>().await.unwrap()["delayed_ms"], 800);
    assert_eq!(server.run.await.unwrap(), ShutdownOutcome::Drained);
}

#[tokio::test]
async fn the_drain_bound_ends_a_shutdown() {
    let server = start(64 * 1024, Duration::from_millis(300)).await;
    let slow = tokio::spawn(reqwest::get(format!("{}/debug/delay?ms=60000", server.base)));
    until("the slow request is in flight", || server.in_flight.load(Ordering::SeqCst) == 1).await;
    let stop_requested = Instant::now();
    server.trigger.request();
    assert_eq!(server.run.await.unwrap(), ShutdownOutcome::DrainTimedOut { in_flight: 1 });
    assert!(stop_requested.elapsed() < Duration::from_secs(30), "ended by the bound, not by the request");
    assert!(slow.await.unwrap().is_err(), "the cut request fails");
}

#[tokio::test]
async fn a_second_stop_request_ends_the_drain_at_once() {
    let server = default_server().await;
    let slow = tokio::spawn(reqwest::get(format!("{}/debug/delay?ms=60000", server.base)));
    until("the slow request is in flight", || server.in_flight.load(Ordering::SeqCst) == 1).await;
    server.trigger.request();
    server.trigger.request();
    assert_eq!(server.run.await.unwrap(), ShutdownOutcome::Forced { in_flight: 1 });
    assert!(slow.await.unwrap().is_err());
}

#[tokio::test]
async fn cors_lets_listed_origins_in_with_credentials_and_any_origin_without() {
    let state = Arc::new(AppState::new("cors-node", GatewayOptions::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cors = maas_gateway::middleware::CorsPolicy::new(vec!["https://console.example.com".into()]);
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 1 << 16,
            max_upload_bytes: 0,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors,
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let (_trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    let client = reqwest::Client::new();
    let preflight = |origin: &str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{base}/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let allowed = preflight("https://console.example.com").await.unwrap();
    assert_eq!(allowed.status(), 204);
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://console.example.com");
    assert_eq!(allowed.headers()["access-control-allow-credentials"], "true");
    assert!(allowed.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    let refused = preflight("https://evil.example.net").await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(!refused.headers().contains_key("access-control-allow-origin"));
    let answer =
        client.get(format!("{base}/healthz")).header("origin", "https://console.example.com").send().await.unwrap();
    assert_eq!(answer.headers()["access-control-allow-origin"], "https://console.example.com");
    assert_eq!(answer.headers()["vary"], "origin");
    let other =
        client.get(format!("{base}/healthz")).header("origin", "https://evil.example.net").send().await.unwrap();
    assert!(
        !other.headers().contains_key("access-control-allow-origin"),
        "a page of another origin cannot read the answer"
    );

    let any = maas_gateway::middleware::CorsPolicy::new(vec!["*".into()]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 1 << 16,
            max_upload_bytes: 0,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors: any,
        },
    );
    let widget_base = format!("http://{}", server.local_addr().unwrap());
    let (_trigger2, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    let widget =
        client.get(format!("{widget_base}/healthz")).header("origin", "https://blog.example.org").send().await.unwrap();
    assert_eq!(widget.headers()["access-control-allow-origin"], "https://blog.example.org");
    assert!(!widget.headers().contains_key("access-control-allow-credentials"), "never cookies for any origin");
}
