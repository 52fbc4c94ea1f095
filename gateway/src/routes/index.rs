//! `GET /` and the web console: the single-page app built from `console/` and embedded in
//! the binary by `gateway/build.rs`. Its hashed assets (`/assets/...`) are cached for good;
//! `index.html` is revalidated on every load, so a new build is picked up at once. A
//! browser navigating to one of the console's own paths (`/keys`, `/admin/cluster`) gets
//! `index.html` and the app routes on the client; API paths never do, so an unknown API
//! path stays a JSON 404. Without a built console, `/` is a plain page that says so.

use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::path::Tail;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::state::AppState;

/// One file of the built console.
pub struct ConsoleAsset {
    /// Its path under `console/dist`, with `/` separators.
    pub path: &'static str,
    pub contents: &'static [u8],
    /// Its gzip encoding, for text files worth compressing (made by `build.rs`).
    pub gzip: Option<&'static [u8]>,
}

include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// First path segments that belong to the API and operations, never to the console.
const SERVER_PATHS: [&str; 7] = ["v1", "healthz", "readyz", "metrics", "openapi.json", "debug", "internal"];

pub fn routes(state: &Arc<AppState>) -> BoxedFilter<(Response,)> {
    // The method is checked inside, so other methods on unknown paths stay 404s rather
    // than becoming 405s.
    let root = warp::path::end()
        .and(warp::get())
        .and(warp::header::optional::<String>("accept-encoding"))
        .and(with_state(state))
        .map(|encoding: Option<String>, s: Arc<AppState>| index(&s, accepts_gzip(encoding.as_deref())));
    let files =
        warp::method()
            .and(warp::path::tail())
            .and(warp::header::optional::<String>("accept"))
            .and(warp::header::optional::<String>("accept-encoding"))
            .and(with_state(state))
            .and_then(
                |method: http::Method,
                 tail: Tail,
                 accept: Option<String>,
                 encoding: Option<String>,
                 s: Arc<AppState>| async move {
                    if method != http::Method::GET {
                        return Err(warp::reject::not_found());
                    }
                    let gzip = accepts_gzip(encoding.as_deref());
                    console_file(&s, tail.as_str(), accept.as_deref(), gzip).ok_or_else(warp::reject::not_found)
                },
            );
    root.or(files).unify().boxed()
}

/// The console's start page, or a plain page naming the node when the console is not built.
#[utoipa::path(get, path = "/", tag = "operations", responses((status = 200, content_type = "text/html", body = String)))]
pub fn index(state: &AppState, gzip: bool) -> Response {
    match asset("index.html") {
        Some(page) => file_response(page, gzip),
        None => fallback_page(state),
    }
}

/// The answer for `GET /{path}`: a built file, or the start page for a browser navigating
/// to a console route; `None` (a 404) otherwise.
fn console_file(state: &AppState, path: &str, accept: Option<&str>, gzip: bool) -> Option<Response> {
    if let Some(file) = asset(path) {
        return Some(file_response(file, gzip));
    }
    let first_segment = path.split('/').next().unwrap_or_default();
    let last_segment = path.rsplit('/').next().unwrap_or_default();
    let navigation = accept.is_some_and(|accept| accept.contains("text/html"));
    let console_route =
        !SERVER_PATHS.contains(&first_segment) && first_segment != "assets" && !last_segment.contains('.');
    (navigation && console_route).then(|| index(state, gzip))
}

fn asset(path: &str) -> Option<&'static ConsoleAsset> {
    CONSOLE_ASSETS.iter().find(|file| file.path == path)
}

/// Whether an `Accept-Encoding` header takes gzip (listed, or through `*`, with a
/// non-zero weight).
pub fn accepts_gzip(header: Option<&str>) -> bool {
    let Some(header) = header else { return false };
    let weight = |coding: &str| {
        header.split(',').find_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next()?;
            if !name.eq_ignore_ascii_case(coding) {
                return None;
            }
            let q = parts.find_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")));
            Some(q.map_or(1.0, |q| q.parse::<f32>().unwrap_or(0.0)))
        })
    };
    weight("gzip").or_else(|| weight("*")).is_some_and(|q| q > 0.0)
}

/// A built file with its type, gzipped when it has a gzip encoding and the client takes
/// it; hashed assets are immutable, everything else revalidates.
fn file_response(file: &ConsoleAsset, gzip: bool) -> Response {
    let path = file.path;
    let cache = if path.starts_with("assets/") { "public, max-age=31536000, immutable" } else { "no-cache" };
    let encoded = file.gzip.filter(|_| gzip);
    let mut response = encoded.unwrap_or(file.contents).into_response();
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type(path)));
    headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static(cache));
    headers.insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
    if file.gzip.is_some() {
        // Caches must keep the two encodings apart.
        headers.insert(http::header::VARY, http::HeaderValue::from_static("accept-encoding"));
    }
    if encoded.is_some() {
        headers.insert(http::header::CONTENT_ENCODING, http::HeaderValue::from_static("gzip"));
    }
    response
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A plain HTML page naming the node and linking its operational endpoints.
fn fallback_page(state: &AppState) -> Response {
    let node = html_escape(&state.node_name);
    let version = env!("CARGO_PKG_VERSION");
    let mut response = warp::reply::html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>maas · {node}</title></head>\
         <body><h1>maas {version}</h1><p>Node <b>{node}</b> is serving.</p><ul>\
         <li><a href=\"/openapi.json\">/openapi.json</a>: every route of the API</li>\
         <li><a href=\"/healthz\">/healthz</a> and <a href=\"/readyz\">/readyz</a></li>\
         <li><a href=\"/metrics\">/metrics</a>: Prometheus metrics</li></ul>\
         <p>The web console is not in this build: install nodejs and npm and build again \
         (the build runs <code>npm ci &amp;&amp; npm run build</code> in <code>console/</code>).</p></body></html>"
    ))
    .into_response();
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
