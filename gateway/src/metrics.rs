//! Prometheus metrics: one recorder per process, rendered at `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS_TOTAL: &str = "maas_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "maas_http_request_duration_seconds";
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "maas_http_requests_in_flight";

const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HTTP_REQUEST_DURATION_SECONDS.into()), LATENCY_BUCKETS_SECONDS)
                .expect("latency buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("no other metrics recorder is installed");
            metrics::describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests answered, by method, route and status");
            metrics::describe_histogram!(
                HTTP_REQUEST_DURATION_SECONDS,
                metrics::Unit::Seconds,
                "time from receiving an HTTP request to sending its response head"
            );
            metrics::describe_gauge!(HTTP_REQUESTS_IN_FLIGHT, "HTTP requests being handled now");
            handle
        })
        .clone()
}
