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
    for asset in CONSOLE_ASSETS {
        let (path, contents) = (asset.path, asset.contents);
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
        assert_eq!(header(&response, "content-encoding"), "", "{path}: not asked for gzip");
        assert_eq!(response.bytes().await.unwrap().as_ref(), contents, "{path}");
    }
}

/// Text files go out gzipped to clients that take gzip (browsers do), and decode to the
/// same bytes; clients that do not (or refuse it with q=0) get them as they are.
#[tokio::test]
async fn text_files_are_gzipped_for_clients_that_take_gzip() {
    use std::io::Read as _;
    let (base, _server) = start().await;
    let client = reqwest::Client::new();
    let (mut plain, mut sent) = (0usize, 0usize);
    for asset in CONSOLE_ASSETS {
        let path = asset.path;
        let compressible = [".js", ".css", ".html", ".svg"].iter().any(|ext| path.ends_with(ext));
        if compressible && asset.contents.len() >= 4096 {
            assert!(asset.gzip.is_some(), "{path} ({} bytes) has a gzip encoding", asset.contents.len());
        }
        let response = client
            .get(format!("{base}/{path}"))
            .header("accept-encoding", "br;q=1.0, gzip;q=0.8, *;q=0.1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let encoding = header(&response, "content-encoding");
        let body = response.bytes().await.unwrap();
        if asset.gzip.is_some() {
            assert_eq!(encoding, "gzip", "{path}");
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(body.as_ref()).read_to_end(&mut decoded).unwrap();
            assert_eq!(decoded, asset.contents, "{path}");
            plain += asset.contents.len();
            sent += body.len();
        } else {
            assert_eq!((encoding.as_str(), body.as_ref()), ("", asset.contents), "{path}");
        }
        let refused =
            client.get(format!("{base}/{path}")).header("accept-encoding", "gzip;q=0, identity").send().await.unwrap();
        assert_eq!(header(&refused, "content-encoding"), "", "{path}");
        assert_eq!(refused.bytes().await.unwrap().as_ref(), asset.contents, "{path}");
    }
    if plain > 0 {
        eprintln!("the console's text files: {plain} bytes, {sent} bytes gzipped");
        assert!(sent * 2 < plain, "gzip at least halves the scripts and styles: {plain} → {sent}");
    }
}

#[test]
fn accept_encoding_is_read_with_its_weights() {
    use maas_gateway::routes::index::accepts_gzip;
    for (header, takes) in [
        (None, false),
        (Some("gzip"), true),
        (Some("gzip, deflate, br"), true),
        (Some("br;q=1.0, gzip;q=0.8"), true),
        (Some("GZIP"), true),
        (Some("gzip;q=0"), false),
        (Some("gzip;q=0.000"), false),
        (Some("identity"), false),
        (Some("*"), true),
        (Some("*;q=0"), false),
        (Some("br, *;q=0.5"), true),
        (Some("gzip;q=0, *"), false),
        (Some("deflate"), false),
    ] {
        assert_eq!(accepts_gzip(header), takes, "{header:?}");
    }
}
