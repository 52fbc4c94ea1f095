//! One error type for every route, mapped to an HTTP status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}` in one place.

use std::convert::Infallible;

use http::StatusCode;
use maas_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;
use warp::Reply;
use warp::reply::Response;

/// An error a route returns; it becomes the response's status and OpenAI-shaped body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// A stable machine-readable code, e.g. `payload_too_large`.
    pub code: &'static str,
    pub message: String,
    /// The offending parameter, where there is one.
    pub param: Option<String>,
    /// Sent as `Retry-After` (a quota or a throttle: when to try again).
    pub retry_after_secs: Option<u64>,
}

impl warp::reject::Reject for ApiError {}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, message: message.into(), param: None, retry_after_secs: None }
    }

    #[must_use]
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    #[must_use]
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_secs = Some(seconds.max(1));
        self
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", code, message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", "forbidden", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", "conflict", message)
    }

    pub fn payload_too_large(limit_bytes: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!("request body is larger than this route's limit of {limit_bytes} bytes"),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.clone(),
                code: self.code.to_owned(),
            },
        }
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let mut response = warp::reply::with_status(warp::reply::json(&self.body()), self.status).into_response();
        if let Some(seconds) = self.retry_after_secs {
            response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { .. } => ApiError::not_found(err.to_string()),
            StoreError::Conflict(message) => ApiError::conflict(message),
            StoreError::Forbidden(message) => ApiError::forbidden(message),
            StoreError::InvalidInput(message) => ApiError::bad_request("invalid_input", message),
            StoreError::BlobTooLarge { limit_bytes } => ApiError::payload_too_large(limit_bytes),
            StoreError::BlobDigestMismatch { .. } => ApiError::bad_request("digest_mismatch", err.to_string()),
            StoreError::Redis { .. } => {
                tracing::error!(error = %err, "quota backend failure");
                ApiError::unavailable("the node cannot reach its quota counters; retry shortly")
            }
            StoreError::UnsupportedUrl { .. }
            | StoreError::Connect { .. }
            | StoreError::Migrate(_)
            | StoreError::Database(_)
            | StoreError::BlobCorrupt { .. }
            | StoreError::Io { .. } => {
                tracing::error!(error = %err, "store failure");
                ApiError::internal(
                    "the node's store failed; the request id in x-request-id finds the details in the log",
                )
            }
        }
    }
}

impl From<maas_consensus::ConsensusError> for ApiError {
    fn from(err: maas_consensus::ConsensusError) -> Self {
        use maas_consensus::ConsensusError as E;
        match err {
            E::NotLeader { .. } | E::Dropped | E::LeaderChanged | E::Timeout(_) | E::Stopped => ApiError::unavailable(
                format!("the control plane could not commit the change: {err}; retry it (an election may be on)"),
            ),
            E::Rejected(message) => ApiError::conflict(message),
            other => {
                tracing::error!(error = %other, "control plane failure");
                ApiError::internal(
                    "the control plane failed; the request id in x-request-id finds the details in the log",
                )
            }
        }
    }
}

impl From<maas_actors::session::SessionError> for ApiError {
    fn from(err: maas_actors::session::SessionError) -> Self {
        use maas_actors::session::SessionError as E;
        match err {
            E::Busy { .. } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_request_error", "session_busy", err.to_string())
            }
            E::NotFound { .. } => ApiError::not_found(err.to_string()),
            E::StaleTurn { .. } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_request_error", "stale_turn", err.to_string())
            }
            E::Failed { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", "session_failed", err.to_string())
            }
            E::Unavailable { .. } => ApiError::unavailable(err.to_string()),
            E::Store(store) => ApiError::from(store),
        }
    }
}

/// Turns every rejection, warp's own and ours, into an OpenAI-shaped error response.
pub async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    Ok(api_error_for(&rejection).into_response())
}

fn api_error_for(rejection: &warp::Rejection) -> ApiError {
    use warp::reject::{
        InvalidHeader, InvalidQuery, LengthRequired, MethodNotAllowed, MissingHeader, PayloadTooLarge,
        UnsupportedMediaType,
    };
    if let Some(err) = rejection.find::<ApiError>() {
        return err.clone();
    }
    if rejection.is_not_found() {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_route",
            "no such route: /openapi.json lists the routes this node serves",
        );
    }
    if rejection.find::<MethodNotAllowed>().is_some() {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "this route does not accept that http method: /openapi.json lists the methods",
        );
    }
    if rejection.find::<PayloadTooLarge>().is_some() {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            "request body is too large",
        );
    }
    if rejection.find::<LengthRequired>().is_some() {
        return ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "invalid_request_error",
            "length_required",
            "this route needs a content-length header",
        );
    }
    if rejection.find::<UnsupportedMediaType>().is_some() {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "unsupported content-type: send application/json",
        );
    }
    if let Some(err) = rejection.find::<InvalidQuery>() {
        return ApiError::bad_request("invalid_query", format!("invalid query string: {err}"));
    }
    if let Some(err) = rejection.find::<MissingHeader>() {
        return ApiError::bad_request("missing_header", format!("missing header `{}`", err.name()))
            .with_param(err.name());
    }
    if let Some(err) = rejection.find::<InvalidHeader>() {
        return ApiError::bad_request("invalid_header", format!("invalid header `{}`", err.name()))
            .with_param(err.name());
    }
    tracing::error!(?rejection, "unhandled rejection");
    ApiError::internal("unexpected error handling the request")
}
