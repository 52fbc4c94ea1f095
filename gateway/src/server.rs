//! The HTTP server: accepts connections, runs each request through the middleware and
//! the routes, and shuts down gracefully.
//!
//! Shutdown: the first stop request closes the listener (new connections are refused)
//! and lets in-flight requests finish; the server returns when they have, when the drain
//! bound passes, or at a second stop request, whichever comes first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::middleware::{Middleware, RouteLabels};

/// Sends stop requests to a server: the first starts the drain, the second ends it.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    requests: Arc<watch::Sender<u32>>,
}

/// The receiving side of [`ShutdownTrigger`], given to [`HttpServer::run`].
#[derive(Debug, Clone)]
pub struct Shutdown {
    requests: watch::Receiver<u32>,
}

pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(0);
    (ShutdownTrigger { requests: Arc::new(sender) }, Shutdown { requests: receiver })
}

impl ShutdownTrigger {
    pub fn request(&self) {
        self.requests.send_modify(|count| *count += 1);
    }

    pub fn requests(&self) -> u32 {
        *self.requests.borrow()
    }
}

impl Shutdown {
    /// Resolves once at least `count` stop requests have been made.
    pub async fn requested(&mut self, count: u32) {
        // An error means every trigger is gone: no stop request can come any more.
        if self.requests.wait_for(|n| *n >= count).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a server's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every in-flight request finished.
    Drained,
    /// The drain bound passed with this many requests still in flight; they were cut.
    DrainTimedOut { in_flight: usize },
    /// A second stop request cut this many in-flight requests.
    Forced { in_flight: usize },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_body_bytes: u64,
    /// The body limit of upload routes ([`crate::middleware::UPLOAD_ROUTES`]).
    pub max_upload_bytes: u64,
    pub drain_timeout: Duration,
    /// HTTPS when set (see [`crate::tls::server_config`]); responses then carry HSTS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Which browser origins may call the API (the console elsewhere, embedded widgets).
    pub cors: crate::middleware::CorsPolicy,
}

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HttpServer {
    listener: TcpListener,
    middleware: Arc<Middleware>,
    drain_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl HttpServer {
    /// A server for `routes` on an already bound listener (bind port 0 in tests).
    pub fn new(listener: TcpListener, routes: BoxedFilter<(Response,)>, options: &ServeOptions) -> Self {
        let labels = RouteLabels::new(crate::routes::openapi::documented_routes().into_iter().map(|(_, path)| path));
        let middleware = Arc::new(Middleware {
            routes,
            labels,
            max_body_bytes: options.max_body_bytes,
            max_upload_bytes: options.max_upload_bytes.max(options.max_body_bytes),
            in_flight: Arc::new(AtomicUsize::new(0)),
            hsts: options.tls.is_some(),
            cors: options.cors.clone(),
        });
        let tls = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        HttpServer { listener, middleware, drain_timeout: options.drain_timeout, tls }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A live count of the requests being handled.
    pub fn in_flight(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.middleware.in_flight)
    }

    pub async fn run(self, mut shutdown: Shutdown) -> ShutdownOutcome {
        let HttpServer { listener, middleware, drain_timeout, tls } = self;
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.requested(1) => break,
            };
            while connections.try_join_next().is_some() {}
            let (stream, client_addr) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let middleware = Arc::clone(&middleware);
            let watcher = graceful.watcher();
            let tls = tls.clone();
            connections.spawn(async move {
                let Some(acceptor) = tls else {
                    serve_connection(TokioIo::new(stream), middleware, client_addr, watcher).await;
                    return;
                };
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), middleware, client_addr, watcher).await,
                    Ok(Err(err)) => tracing::debug!(client = %client_addr, error = %err, "tls handshake failed"),
                    Err(_) => tracing::debug!(client = %client_addr, "tls handshake timed out"),
                }
            });
        }
        drop(listener);
        let in_flight = Arc::clone(&middleware.in_flight);
        tracing::info!(
            in_flight = in_flight.load(Ordering::SeqCst),
            drain_timeout_secs = drain_timeout.as_secs_f64(),
            "stopped accepting; draining"
        );
        let outcome = tokio::select! {
            () = graceful.shutdown() => ShutdownOutcome::Drained,
            () = tokio::time::sleep(drain_timeout) => ShutdownOutcome::DrainTimedOut { in_flight: in_flight.load(Ordering::SeqCst) },
            () = shutdown.requested(2) => ShutdownOutcome::Forced { in_flight: in_flight.load(Ordering::SeqCst) },
        };
        connections.abort_all();
        outcome
    }
}

/// Serves HTTP/1 or HTTP/2 on one connection until it closes or the drain closes it.
async fn serve_connection<IO>(io: IO, middleware: Arc<Middleware>, client_addr: SocketAddr, watcher: Watcher)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let middleware = Arc::clone(&middleware);
        async move { Ok::<_, std::convert::Infallible>(middleware.handle(request, client_addr).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(io, service);
    if let Err(err) = watcher.watch(connection).await {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}
