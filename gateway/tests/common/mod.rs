//! What several gateway tests share: a node's gateway over a real store, on a loopback
//! port.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use maas_gateway::{AppState, HttpServer, ServeOptions, ShutdownTrigger};
use tokio::net::TcpListener;

/// Opens (and migrates) the database at `url` and a blob store in `dir` for `state`.
pub async fn open_stores(state: &AppState, url: String, dir: &std::path::Path) {
    let db = maas_store::Db::connect(&maas_store::DbOptions::new(url)).await.unwrap();
    db.migrate().await.unwrap();
    let blobs = maas_store::BlobStore::open(dir.join("blobs")).await.unwrap();
    let _ = state.stores.set(maas_gateway::state::Stores { db, blobs, data_dir: dir.to_owned() });
    let knowledge =
        maas_gateway::knowledge::KnowledgeService::new(maas_gateway::knowledge::KnowledgeOptions::default());
    let _ = state.knowledge.set(Arc::new(knowledge));
}

/// Serves `state`'s routes on 127.0.0.1 with 1 MiB bodies; the base url and the trigger
/// that stops the server.
pub async fn serve(state: &Arc<AppState>) -> (String, ShutdownTrigger) {
    serve_on(state, TcpListener::bind("127.0.0.1:0").await.unwrap(), 1 << 20)
}

/// Serves `state`'s routes on `listener`, uploads up to `max_upload_bytes`.
pub fn serve_on(state: &Arc<AppState>, listener: TcpListener, max_upload_bytes: u64) -> (String, ShutdownTrigger) {
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(state),
        &ServeOptions {
            max_body_bytes: 1 << 20,
            max_upload_bytes,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    (base, trigger)
}
