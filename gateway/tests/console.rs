//! The web console as the gateway serves it: the start page, hashed assets cached for good,
//! `index.html` for a browser's navigation to a console route, and API paths that stay
//! JSON errors. Holds with the console built (`console/dist` embedded) or not (the plain
//! page).

use std::sync::Arc;
use std::time::Duration;

use maas_gateway::routes::index::CONSOLE_ASSETS;
use maas_gateway::{AppState, GatewayOptions, HttpServer, ServeOptions, ShutdownTrigger};
use serde_json::Value;
use tokio::net::TcpListener;

/// A gateway on a free port; the server runs while the returned trigger lives.
async fn start() -> (String, ShutdownTrigger) {
    let state = Arc::new(AppState::new("console-node", GatewayOptions::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 64 * 1024,
            max_upload_bytes: 0,
            drain_timeout: Duration::from_secs(5),
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    (base, trigger)
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn the_start_page_is_html_that_is_revalidated() {
    let (base, _server) = start().await;
    let response = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/html"));
    assert_eq!(header(&response, "cache-control"), "no-cache");
    let page = response.text().await.unwrap();
    if CONSOLE_ASSETS.is_empty() {
        assert!(page.contains("console-node") && page.contains("npm run build"), "{page}");
    } else {
        assert!(page.contains("<div id=\"app\">"), "{page}");
    }
}

#[tokio::test]
async fn a_browser_navigating_to_a_console_route_gets_the_start_page() {
    let (base, _server) = start().await;
    let client = reqwest::Client::new();
    let start_page = reqwest::get(format!("{base}/")).await.unwrap().text().await.unwrap();
    for path in ["/keys", "/admin/cluster", "/playground"] {
        let response = client.get(format!("{base}{path}")).header("accept", "text/html,*/*").send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.text().await.unwrap(), start_page, "{path}");
    }
}

#[tokio::test]
async fn api_paths_and_missing_files_stay_json_404s() {
    let (base, _server) = start().await;
    let client = reqwest::Client::new();
    let table: [(reqwest::Method, &str, Option<&str>); 6] = [
        (reqwest::Method::GET, "/v1/nothing-here", Some("text/html")),
        (reqwest::Method::GET, "/v1/nothing-here", None),
        (reqwest::Method::GET, "/assets/missing-0123abcd.js", Some("text/html")),
        (reqwest::Method::GET, "/no/such/route", None),
        (reqwest::Method::GET, "/favicon-missing.png", Some("text/html")),
        (reqwest::Method::POST, "/keys", Some("text/html")),
    ];
    for (method, path, accept) in table {
        let mut request = client.request(method.clone(), format!("{base}{path}"));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        assert_eq!(header(&response, "content-type"), "application/json", "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unknown_route", "{method} {path}: {body}");
    }
}

#[tokio::test]
async fn built_files_are_served_with_their_type_and_hashed_ones_cached_for_good() {
    let (base, _server) = start().await;
    for (path, contents) in CONSOLE_ASSETS {
        let response = reqwest::get(format!("{base}/{path}")).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let cache = header(&response, "cache-control");
        if path.starts_with("assets/") {
            assert_eq!(cache, "public, max-age=31536000, immutable", "{path}");
        } else {
            assert_eq!(cache, "no-cache", "{path}");
        }
        let kind = header(&response, "content-type");
        let expected = match path.rsplit('.').next().unwrap_or_default() {
            "js" => "text/javascript",
            "css" => "text/css",
            "html" => "text/html",
            "svg" => "image/svg+xml",
            _ => "",
        };
        assert!(kind.starts_with(expected), "{path}: {kind}");
        assert_eq!(response.bytes().await.unwrap().as_ref(), *contents, "{path}");
    }
}
