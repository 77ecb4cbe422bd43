//! Prometheus metrics of the agent, with the original's names (compat §9). "Socket" metrics
//! describe the gRPC stream so the original alert rules keep working.
//!
//! `/metrics` also renders Prometheus' default registry: it holds what is per process rather than
//! per agent — `process_*` (the crate's process collector) and `dmr_log_write_failures_total`
//! (registered by the binary's log set-up).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The commit this binary was built from: `DMR_GIT_COMMIT` at build time (the Dockerfile or CI
/// sets it), else "unknown" — the build never needs git.
pub const GIT_COMMIT: &str = match option_env!("DMR_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// `dmr_build_info{version,commit} 1`, the usual way to tell which build a target runs.
pub fn build_info() -> IntGaugeVec {
    let gauge = IntGaugeVec::new(
        Opts::new("dmr_build_info", "Build of this process (always 1)"),
        &["version", "commit"],
    )
    .unwrap_or_else(|_| unreachable!("a static metric definition is valid"));
    gauge.with_label_values(&[env!("CARGO_PKG_VERSION"), GIT_COMMIT]).set(1);
    gauge
}

/// All agent metrics.
pub struct Metrics {
    /// The registry behind `/metrics`.
    pub registry: Registry,
    /// HTTP requests by method and route.
    pub http_requests: IntCounterVec,
    /// HTTP request durations by method, route and status.
    pub http_duration: HistogramVec,
    /// HTTP answers with status ≥ 400.
    pub http_errors: IntCounter,
    /// HTTP answers with status < 400.
    pub http_success: IntCounter,
    /// 1 while the stream to the server is open.
    pub connection_active: IntGauge,
    /// How long streams lasted.
    pub connection_duration: Histogram,
    /// Stream failures.
    pub socket_errors: IntCounter,
    /// Frames received from the server, by event.
    pub events_received: IntCounterVec,
    /// Frames sent to the server, by event.
    pub events_sent: IntCounterVec,
    /// Time to decrypt and hand an incoming message to the internal endpoint.
    pub message_processing: Histogram,
    /// Redeliveries of already delivered messages that were not POSTed again.
    pub duplicates_suppressed: IntCounter,
    /// Deliveries answered without posting, behind one the endpoint refused (the server hands them
    /// over again, in order).
    pub deliveries_held_back: IntCounter,
    /// Connections to the next server address made at once, after a stream ended or failed.
    pub failovers: IntCounter,
    /// Pauses before reconnecting, taken after every address failed in turn.
    pub reconnect_backoffs: IntCounter,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let _ = registry.register(Box::new(build_info()));
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.unwrap_or_else(|_| unreachable!("static metric definitions are valid"));
                let _ = registry.register(Box::new(m.clone()));
                m
            }};
        }
        Self {
            http_requests: reg!(IntCounterVec::new(
                Opts::new("dmr_http_requests_total", "HTTP requests"),
                &["method", "route"]
            )),
            http_duration: reg!(HistogramVec::new(
                HistogramOpts::new("dmr_http_request_duration_seconds", "HTTP request duration")
                    .buckets(latency_buckets()),
                &["method", "route", "status"]
            )),
            http_errors: reg!(IntCounter::new(
                "dmr_http_errors_total",
                "HTTP answers with status >= 400"
            )),
            http_success: reg!(IntCounter::new(
                "dmr_http_success_total",
                "HTTP answers with status < 400"
            )),
            connection_active: reg!(IntGauge::new(
                "dmr_agent_socket_connection_active",
                "1 while the stream to the DMR server is open"
            )),
            connection_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "dmr_socket_connection_duration_seconds",
                    "Duration of streams to the DMR server"
                )
                .buckets(vec![1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0])
            )),
            socket_errors: reg!(IntCounter::new("dmr_socket_errors_total", "Stream failures")),
            events_received: reg!(IntCounterVec::new(
                Opts::new(
                    "dmr_socket_events_received_total",
                    "Frames received from the DMR server"
                ),
                &["event"]
            )),
            events_sent: reg!(IntCounterVec::new(
                Opts::new("dmr_socket_events_sent_total", "Frames sent to the DMR server"),
                &["event"]
            )),
            message_processing: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "dmr_message_processing_duration_seconds",
                    "Incoming message handling time"
                )
                .buckets(latency_buckets())
            )),
            duplicates_suppressed: reg!(IntCounter::new(
                "dmr_duplicates_suppressed_total",
                "Redeliveries of already delivered messages that were not POSTed again"
            )),
            deliveries_held_back: reg!(IntCounter::new(
                "dmr_deliveries_held_back_total",
                "Deliveries answered without posting, behind one the endpoint refused (redelivered in order)"
            )),
            failovers: reg!(IntCounter::new(
                "dmr_agent_failovers_total",
                "Connection attempts to the next server address made without a pause"
            )),
            reconnect_backoffs: reg!(IntCounter::new(
                "dmr_agent_reconnect_backoffs_total",
                "Pauses before reconnecting, after every server address failed in turn"
            )),
            registry,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn build_info_and_process_metrics_are_exposed() {
        let text = Metrics::new().render();
        let expected = format!(
            "dmr_build_info{{commit=\"{}\",version=\"{}\"}} 1",
            super::GIT_COMMIT,
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&expected), "{text}");
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
