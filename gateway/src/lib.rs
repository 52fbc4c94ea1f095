//! The HTTP gateway every node runs: warp routes behind a thin hyper server that adds
//! request ids, tracing spans, body limits, metrics and graceful shutdown.
//!
//! **Boundary:** errors become HTTP statuses only in [`error`]; handlers never block the
//! async runtime.

pub mod auth;
pub mod error;
pub mod json;
pub mod knowledge;
pub mod load;
pub mod metering;
pub mod metrics;
pub mod middleware;
pub mod model_text;
pub mod monitor;
pub mod notify;
pub mod response_cache;
pub mod response_format;
pub mod routes;
pub mod safety;
pub mod server;
pub mod state;
pub mod tls;

pub use error::ApiError;
pub use server::{HttpServer, ServeOptions, Shutdown, ShutdownOutcome, ShutdownTrigger, shutdown_channel};
pub use state::{AppState, Check, GatewayOptions};
