//! Reading a Prometheus text exposition, as a scraper would.

/// The value of exactly `series` (a metric name, with its `{labels}` if it has any) in `text`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
