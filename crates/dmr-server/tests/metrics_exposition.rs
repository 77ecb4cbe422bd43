//! The server's `/metrics` text carries what operators expect of every target besides DMR's own
//! metrics: `dmr_build_info{version,commit}` and the `process_*` metrics.

#[test]
fn metrics_carry_build_info_and_process_metrics() {
    let text = dmr_server::metrics::Metrics::new().render();
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(
        text.lines().any(|l| l.starts_with("dmr_build_info{")
            && l.contains(&version)
            && l.contains("commit=\"")
            && l.ends_with(" 1")),
        "no dmr_build_info sample:\n{text}"
    );
    #[cfg(target_os = "linux")]
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))),
            "no {name} sample:\n{text}"
        );
    }
}
