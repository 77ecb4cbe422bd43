//! `--runs N`: the same rows of every run side by side, as the median and the min–max of each key
//! figure (printed, and in the JSON's `medians`).
//!
//! Rows are matched across runs by scenario name and their position among that scenario's rows
//! (the n-th "e2e 1 pair" row of each run), since some offered loads are derived from a ceiling
//! measured in the same run and so differ between runs.

use crate::measure::Row;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// Median, min and max of a set of figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many finite figures it was taken over.
    pub n: usize,
}

/// The finite figures `f` gives for `rows`.
pub fn values<'a>(rows: &[&'a Row], f: impl Fn(&'a Row) -> Option<f64>) -> Vec<f64> {
    rows.iter().filter_map(|r| f(r)).filter(|v| v.is_finite()).collect()
}

/// Median (the mean of the middle two for an even count), min and max; `None` when empty.
pub fn stat(values: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// "12.3" for one figure, "12.3 (11.0–14.2)" for several, "-" for none.
pub fn fmt_stat(values: &[f64], decimals: usize) -> String {
    match stat(values) {
        None => "-".into(),
        Some(s) if s.n == 1 || s.min == s.max => format!("{:.decimals$}", s.median),
        Some(s) => format!("{:.decimals$} ({:.decimals$}–{:.decimals$})", s.median, s.min, s.max),
    }
}

/// The rows of all runs grouped as described in the module docs, in the first run's order.
pub fn group(runs: &[Vec<Row>]) -> Vec<Vec<&Row>> {
    let mut keys: Vec<(String, usize)> = Vec::new();
    let mut groups: Vec<Vec<&Row>> = Vec::new();
    for rows in runs {
        let mut seen: Vec<(&str, usize)> = Vec::new();
        for row in rows {
            let k = match seen.iter_mut().find(|(s, _)| *s == row.scenario) {
                Some((_, k)) => {
                    *k += 1;
                    *k
                }
                None => {
                    seen.push((&row.scenario, 0));
                    0
                }
            };
            let key = (row.scenario.clone(), k);
            match keys.iter().position(|x| *x == key) {
                Some(i) => groups[i].push(row),
                None => {
                    keys.push(key);
                    groups.push(vec![row]);
                }
            }
        }
    }
    groups
}

/// The offered load of a group: the same text in every run, or "first … (varies)".
fn load_label(group: &[&Row]) -> String {
    let first = group[0].load.clone();
    if group.iter().all(|r| r.load == first) {
        first
    } else {
        format!("{first} (varies)")
    }
}

/// Prints the medians table of `runs` (one `Vec<Row>` per run).
pub fn print(runs: &[Vec<Row>]) {
    println!(
        "\nmedian (min–max) of {} runs; rows matched by scenario and position:",
        runs.len()
    );
    println!(
        "{:<34} {:>22} {:>24} {:>22} {:>24} {:>20}",
        "scenario", "offered", "msg/s", "p50 ms", "p99 ms", "ratio"
    );
    for g in group(runs) {
        println!(
            "{:<34} {:>22} {:>24} {:>22} {:>24} {:>20}",
            format!("{} [{}×]", g[0].scenario, g.len()),
            load_label(&g),
            fmt_stat(&values(&g, |r| Some(r.msg_per_s)), 0),
            fmt_stat(&values(&g, |r| r.latency_ms.map(|l| l.p50)), 2),
            fmt_stat(&values(&g, |r| r.latency_ms.map(|l| l.p99)), 2),
            fmt_stat(&values(&g, |r| r.ratio), 2),
        );
        if g[0].scenario == crate::pair::SCENARIO {
            crate::pair::print_details(&g);
        } else if g[0].extra.contains_key("rsa_ms") {
            print_combined_details(&g);
        }
    }
}

/// The components of the combined ceiling (one row, or the median over runs).
pub fn print_combined_details(rows: &[&Row]) {
    let f = |key: &str, decimals: usize| fmt_stat(&values(rows, |r| r.extra.get(key).copied()), decimals);
    println!(
        "    = {} cores ÷ (RSA {} ms + RabbitMQ {} ms [beam.smp {} + AMQP client {}]) per message; beam.smp only: {} msg/s",
        f("cores", 0),
        f("rsa_ms", 3),
        f("rabbit_ms", 3),
        f("rabbit_beam_ms", 3),
        f("rabbit_client_ms", 3),
        f("beam_only_msg_per_s", 0),
    );
}

fn stat_json(values: &[f64]) -> Value {
    stat(values).map_or(Value::Null, |s| json!(s))
}

/// The medians as JSON: one object per row group.
pub fn medians_json(runs: &[Vec<Row>]) -> Value {
    let groups = group(runs);
    Value::Array(
        groups
            .iter()
            .map(|g| {
                let keys: BTreeSet<&String> = g.iter().flat_map(|r| r.extra.keys()).collect();
                let extra: serde_json::Map<String, Value> = keys
                    .into_iter()
                    .map(|k| (k.clone(), stat_json(&values(g, |r| r.extra.get(k).copied()))))
                    .collect();
                json!({
                    "scenario": g[0].scenario,
                    "load": load_label(g),
                    "runs": g.len(),
                    "msg_per_s": stat_json(&values(g, |r| Some(r.msg_per_s))),
                    "p50_ms": stat_json(&values(g, |r| r.latency_ms.map(|l| l.p50))),
                    "p95_ms": stat_json(&values(g, |r| r.latency_ms.map(|l| l.p95))),
                    "p99_ms": stat_json(&values(g, |r| r.latency_ms.map(|l| l.p99))),
                    "ratio": stat_json(&values(g, |r| r.ratio)),
                    "errors": stat_json(&values(g, |r| Some(r.errors as f64))),
                    "extra": extra,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = stat(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = stat(&[4.0, 1.0, 2.0, f64::NAN, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        assert!(stat(&[f64::NAN]).is_none());
    }

    #[test]
    fn rows_are_matched_by_scenario_and_position() {
        let row = |scenario: &str, load: &str, v: f64| Row {
            scenario: scenario.into(),
            load: load.into(),
            msg_per_s: v,
            ..Row::default()
        };
        let runs = vec![
            vec![row("a", "1", 1.0), row("b", "x", 2.0), row("a", "2", 3.0)],
            vec![row("a", "1", 10.0), row("b", "y", 20.0), row("a", "2", 30.0)],
        ];
        let g = group(&runs);
        assert_eq!(g.len(), 3);
        assert_eq!(values(&g[0], |r| Some(r.msg_per_s)), vec![1.0, 10.0]);
        assert_eq!(values(&g[2], |r| Some(r.msg_per_s)), vec![3.0, 30.0]);
        assert_eq!(load_label(&g[1]), "x (varies)");
        assert_eq!(fmt_stat(&[1.0, 10.0], 1), "5.5 (1.0–10.0)");
    }
}
