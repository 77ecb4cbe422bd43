"""monitoring/: alert rules (promtool check + unit tests, the original's names, real metric names),
the Prometheus configuration of compose.yaml, and the Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .common import ROOT, Results, load_yaml, output_problem, run
from .compose import compose_command, compose_env

# The original README's suggested alert rules, by group ("Suggested alert rules"): they must stay,
# in this order, under these names; further rules may follow them.
ORIGINAL_ALERTS = {
    "dmr-server-alerts": ["DMRHighDisconnectionRate", "DMRServerSocketsDown", "DMRServerMessageRoutingLatencyHigh"],
    "dmr-agent-alerts": ["MultipleSocketConnections", "SocketDisconnected", "HighApiLatency", "TooManyHttpErrors"],
    "dmr-rabbitmq-alerts": [
        "RabbitMQHighReadyMessages",
        "RabbitMQUnauthorizedAcks",
        "RabbitMQNodeDown",
        "RabbitMQMemoryHigh",
        "RabbitMQDiskLow",
    ],
}

# Metrics the dashboard must show: connections, throughput, latency, retries, dead letters (counted
# and queued), validation failures, broker connection, directory health.
DASHBOARD_REQUIRED_METRICS = [
    "dmr_socket_connections_active",
    "dmr_agent_socket_connection_active",
    "dmr_socket_events_received_total",
    "dmr_messages_delivered_total",
    "dmr_message_processing_duration_seconds_bucket",
    "dmr_rabbitmq_publish_confirm_duration_seconds_bucket",
    "dmr_delivery_retries_total",
    "dmr_dead_lettered_total",
    "dmr_validation_failures_total",
    "dmr_rabbitmq_connected",
    "rabbitmq_detailed_queue_messages",
    "dmr_directory_refresh_failing",
    "dmr_directory_age_seconds",
    "dmr_directory_agents",
]

ALERTS = ROOT / "monitoring/alerts.yml"
ALERT_TESTS = sorted((ROOT / "monitoring/tests").glob("*.yml"))


def check_alerts(res: Results, promtool: str, metrics) -> dict:
    res.check("promtool check rules monitoring/alerts.yml", output_problem(run([promtool, "check", "rules", str(ALERTS)])))
    res.check(
        "promtool test rules monitoring/tests/*.yml (each rule fires when it should, silent when not)",
        output_problem(run([promtool, "test", "rules", *map(str, ALERT_TESTS)])) if ALERT_TESTS else ["no tests"],
    )
    doc = load_yaml(ALERTS)
    problems = []
    groups = {g["name"]: [r.get("alert") for r in g.get("rules", [])] for g in doc.get("groups", [])}
    for g, alerts in ORIGINAL_ALERTS.items():
        if g not in groups:
            problems.append(f"group {g} is missing")
        elif groups[g][: len(alerts)] != alerts:
            problems.append(f"group {g}: alerts {groups[g]} do not start with the original's {alerts}")
    tested = set()
    for t in ALERT_TESTS:
        for case in load_yaml(t).get("tests") or []:
            tested |= {a.get("alertname") for a in case.get("alert_rule_test") or []}
    exprs = []
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            name = f"{g['name']}/{r.get('alert')}"
            for key in ("alert", "expr", "for", "labels", "annotations"):
                if key not in r:
                    problems.append(f"{name}: no {key}")
            if (r.get("labels") or {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{name}: severity label missing or unknown")
            if r.get("alert") not in tested:
                problems.append(f"{name}: no unit test in monitoring/tests/ evaluates it")
            exprs.append(str(r.get("expr", "")))
    res.check("monitoring/alerts.yml: the original's alert names, labels, a unit test per rule", problems)
    res.check(
        "monitoring/alerts.yml: every metric is exported by the code or RabbitMQ's plugin",
        metrics.problems(exprs, "alerts.yml"),
    )
    return doc


def check_prometheus_config(res: Results, promtool: str, compose: dict | None) -> None:
    path = ROOT / "monitoring/prometheus.yml"
    res.check("promtool check config monitoring/prometheus.yml", output_problem(run([promtool, "check", "config", str(path)])))
    if compose is None:
        return
    cfg = load_yaml(path)
    problems = []
    if "alerts.yml" not in [Path(f).name for f in cfg.get("rule_files") or []]:
        problems.append("rule_files does not load alerts.yml")
    services = compose.get("services") or {}
    prom = services.get("prometheus") or {}
    mounts = [str(v) for v in prom.get("volumes") or []]
    for local, target in (("monitoring/prometheus.yml", "/etc/prometheus/prometheus.yml"), ("monitoring/alerts.yml", "/etc/prometheus/alerts.yml")):
        if not any(m.startswith(f"./{local}:{target}") for m in mounts):
            problems.append(f"compose service prometheus does not mount ./{local} at {target}")
    # The port each compose service serves metrics on.
    expected_port = {}
    for name, svc in services.items():
        cmd, env = compose_command(svc), compose_env(svc)
        if cmd[:1] == ["server"]:
            expected_port[name] = {env.get("PORT", "8075")}
        elif cmd[:1] == ["agent"]:
            expected_port[name] = {env.get("PORT", "8077")}
        elif name == "rabbitmq":
            expected_port[name] = {"15692"}
    scraped = set()
    jobs = {}
    for job in cfg.get("scrape_configs") or []:
        jobs[job["job_name"]] = job
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                host, _, port = target.rpartition(":")
                scraped.add(host)
                if host not in services:
                    problems.append(f"job {job['job_name']}: target {target} is not a compose service")
                elif host in expected_port and port not in expected_port[host]:
                    problems.append(f"job {job['job_name']}: {target} but {host} serves metrics on {sorted(expected_port[host])}")
    for name in expected_port:
        if name not in scraped:
            problems.append(f"compose service {name} is not scraped")
    # The jobs the alert rules and the dashboard select on.
    for job in ("dmr-server", "dmr-agent", "rabbitmq"):
        if job not in jobs:
            problems.append(f"no scrape job {job} (the alert rules select on it)")
    queues = jobs.get("rabbitmq-queues") or {}
    if queues.get("metrics_path") != "/metrics/detailed" or "queue_coarse_metrics" not in (queues.get("params") or {}).get("family", []):
        problems.append("no job rabbitmq-queues scraping /metrics/detailed?family=queue_coarse_metrics (the DLQ panel)")
    res.check("monitoring/prometheus.yml scrapes every server, agent and RabbitMQ of compose.yaml under the jobs the rules use", problems)


def check_dashboard(res: Results, metrics) -> None:
    path = ROOT / "monitoring/grafana-dashboard.json"
    problems: list[str] = []
    try:
        dash = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        res.check("monitoring/grafana-dashboard.json", [str(e)])
        return
    exprs, ids = [], []

    def walk(panels):
        for p in panels:
            ids.append(p.get("id"))
            exprs.extend(t["expr"] for t in p.get("targets") or [] if t.get("expr"))
            walk(p.get("panels") or [])

    walk(dash.get("panels") or [])
    for key in ("title", "uid", "schemaVersion", "panels"):
        if key not in dash:
            problems.append(f"no {key}")
    if len(ids) != len(set(ids)):
        problems.append("panel ids are not unique")
    text = "\n".join(exprs)
    for m in DASHBOARD_REQUIRED_METRICS:
        if not re.search(rf"\b{m}\b", text):
            problems.append(f"no panel queries {m}")
    for e in exprs:
        if "histogram_quantile" in e and "_bucket" not in e:
            problems.append(f"histogram_quantile without a _bucket series: {e}")
    problems += metrics.problems(exprs, "dashboard")
    res.check("monitoring/grafana-dashboard.json: panels and metric names", problems)
