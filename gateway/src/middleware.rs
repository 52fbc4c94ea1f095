//! What every request goes through before and after its route: a request id, a
//! tracing span, the body-size limit, and the request count and latency metrics.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tower_service::Service;
use tracing::Instrument;
use warp::Reply;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::error::ApiError;
use crate::metrics::{HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_IN_FLIGHT, HTTP_REQUESTS_TOTAL};

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Browsers keep to HTTPS for this host for a year once they have seen it.
const HSTS: &str = "max-age=31536000; includeSubDomains";

/// Facts about the request that routes may read with `warp::ext::get::<RequestContext>()`.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub client_addr: SocketAddr,
}

/// Maps a request path to the route template it matched (`/v1/models/{id}`), so
/// metrics have one series per route rather than one per url.
#[derive(Debug, Clone)]
pub struct RouteLabels {
    templates: Vec<(Vec<String>, String)>,
}

impl RouteLabels {
    pub fn new(templates: impl IntoIterator<Item = String>) -> Self {
        let mut templates: Vec<(Vec<String>, String)> =
            templates.into_iter().map(|t| (segments(&t).map(str::to_owned).collect(), t)).collect();
        templates.sort();
        templates.dedup();
        RouteLabels { templates }
    }

    /// The template `path` matches, or `unmatched`.
    pub fn label(&self, path: &str) -> &str {
        let parts: Vec<&str> = segments(path).collect();
        self.templates
            .iter()
            .find(|(template, _)| {
                template.len() == parts.len()
                    && template.iter().zip(&parts).all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
            })
            .map_or("unmatched", |(_, label)| label.as_str())
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Routes (method, template) whose bodies may be as large as `gateway.max_upload_bytes`.
pub const UPLOAD_ROUTES: &[(&str, &str)] =
    &[("POST", "/v1/blobs"), ("POST", "/v1/files"), ("POST", "/v1/knowledge_bases/{id}/documents")];

/// Shared by every connection of one server.
pub(crate) struct Middleware {
    pub(crate) routes: BoxedFilter<(Response,)>,
    pub(crate) labels: RouteLabels,
    pub(crate) max_body_bytes: u64,
    pub(crate) max_upload_bytes: u64,
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// Whether responses carry Strict-Transport-Security (the server speaks HTTPS).
    pub(crate) hsts: bool,
    pub(crate) cors: CorsPolicy,
}

/// The CORS policy: which browser origins may call the API from their pages. Listed
/// origins (`https://console.example.com`) may send credentials (the console's session
/// cookie); `*` lets any page call with an API key but never with cookies (embedded
/// widgets). No origins: browsers keep pages of other origins out, as by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsPolicy {
    origins: Vec<String>,
    any: bool,
}

/// Headers a browser page may send and read.
const CORS_ALLOW_HEADERS: &str = "authorization, content-type, openai-organization, x-maas-org, x-request-id";
const CORS_EXPOSE_HEADERS: &str = "x-request-id, retry-after, x-maas-cache";

impl CorsPolicy {
    pub fn new(origins: Vec<String>) -> Self {
        let any = origins.iter().any(|o| o == "*");
        let origins = origins.into_iter().filter(|o| o != "*").map(|o| o.trim_end_matches('/').to_owned()).collect();
        CorsPolicy { origins, any }
    }

    /// The headers that let `origin` read the answer, or none when it may not.
    fn headers_for(&self, origin: &str) -> Option<Vec<(http::HeaderName, HeaderValue)>> {
        let listed = self.origins.iter().any(|o| o == origin);
        if !listed && !self.any {
            return None;
        }
        let mut headers = vec![
            (http::header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_str(origin).ok()?),
            (http::header::VARY, HeaderValue::from_static("origin")),
            (http::header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(CORS_EXPOSE_HEADERS)),
        ];
        if listed {
            headers.push((http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true")));
        }
        Some(headers)
    }

    /// The answer to a preflight (`OPTIONS` with `access-control-request-method`).
    fn preflight(&self, origin: &str) -> Response {
        let Some(headers) = self.headers_for(origin) else {
            return ApiError::new(
                http::StatusCode::FORBIDDEN,
                "permission_error",
                "cors_origin_not_allowed",
                format!("pages from {origin} may not call this api (gateway.cors_allowed_origins)"),
            )
            .into_response();
        };
        let mut response = warp::reply::with_status(warp::reply(), http::StatusCode::NO_CONTENT).into_response();
        for (name, value) in headers {
            response.headers_mut().insert(name, value);
        }
        let allow = response.headers_mut();
        allow.insert(
            http::header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
        );
        allow.insert(http::header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(CORS_ALLOW_HEADERS));
        allow.insert(http::header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        response
    }
}

impl Middleware {
    pub(crate) async fn handle(self: Arc<Self>, mut request: Request<Incoming>, client_addr: SocketAddr) -> Response {
        let started = Instant::now();
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
        let method = request.method().clone();
        let route = self.labels.label(request.uri().path()).to_owned();
        let span = tracing::info_span!("request", request_id = %request_id, method = %method, route = %route, client = %client_addr);
        let _in_flight = InFlight::enter(&self.in_flight);

        let declared_len = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let exceeded = Arc::new(AtomicBool::new(false));
        let limit = if UPLOAD_ROUTES.iter().any(|(m, r)| *m == method.as_str() && *r == route) {
            self.max_upload_bytes
        } else {
            self.max_body_bytes
        };
        let origin = request.headers().get(http::header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let preflight = method == http::Method::OPTIONS
            && request.headers().contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        let mut response = if let (true, Some(origin)) = (preflight, origin.as_deref()) {
            self.cors.preflight(origin)
        } else if declared_len.is_some_and(|len| len > limit) {
            ApiError::payload_too_large(limit).into_response()
        } else {
            request.extensions_mut().insert(RequestContext { request_id: request_id.clone(), client_addr });
            let request =
                request.map(|body| LimitedBody { inner: body, remaining: limit, exceeded: Arc::clone(&exceeded) });
            let mut routes = warp::service(self.routes.clone());
            match routes.call(request).instrument(span.clone()).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        };
        if exceeded.load(Ordering::Relaxed) {
            response = ApiError::payload_too_large(limit).into_response();
        }
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        if self.hsts {
            response.headers_mut().insert(http::header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(HSTS));
        }
        if !preflight && let Some(headers) = origin.as_deref().and_then(|o| self.cors.headers_for(o)) {
            for (name, value) in headers {
                response.headers_mut().insert(name, value);
            }
        }

        let status = response.status();
        let elapsed = started.elapsed();
        let labels = [("method", method.to_string()), ("route", route), ("status", status.as_u16().to_string())];
        metrics::counter!(HTTP_REQUESTS_TOTAL, &labels).increment(1);
        metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, &labels).record(elapsed.as_secs_f64());
        span.in_scope(|| {
            let latency_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0;
            if status.is_server_error() {
                tracing::warn!(status = status.as_u16(), latency_ms, "request failed");
            } else {
                tracing::info!(status = status.as_u16(), latency_ms, "request");
            }
        });
        response
    }
}

/// Counts a request as in flight until dropped, also when the client goes away.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT).increment(1.0);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

/// A request body that fails once more than `remaining` bytes arrive, also when the
/// client sent no content-length; the flag turns the route's answer into a 413.
pub(crate) struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    exceeded: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the limit")]
struct BodyTooLarge;

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Box::new(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_route_templates() {
        let labels = RouteLabels::new(["/healthz".to_owned(), "/v1/models/{model}".to_owned(), "/".to_owned()]);
        let table = [
            ("/healthz", "/healthz"),
            ("/healthz/", "/healthz"),
            ("/v1/models/llama", "/v1/models/{model}"),
            ("/v1/models", "unmatched"),
            ("/v1/models/a/b", "unmatched"),
            ("/", "/"),
            ("/nope", "unmatched"),
        ];
        for (path, want) in table {
            assert_eq!(labels.label(path), want, "{path}");
        }
    }
}
