#!/usr/bin/env python3
"""Checks the deployment files (Dockerfile, compose.yaml, monitoring/, k8s/) against each other and
against the code. Run through `bash scripts/check-deploy.sh`, which installs what this needs
(PyYAML, jsonschema, kubernetes-validate, kubectl, promtool) and passes their paths.

What is checked:
- code: the environment variables `dmr server` and `dmr agent` read (clap `env = "..."` in
  crates/dmr-{server,agent}/src/config.rs, env::var in those crates and in
  crates/dmr-cli/src/logging.rs) and the metric names they export (crates/*/src/metrics.rs);
- monitoring/alerts.yml: promtool, the original's alert names, every dmr_* metric exists, no
  histogram used by its bare name; monitoring/prometheus.yml: promtool, targets match compose;
  the Grafana dashboard: valid JSON, the required panels' metrics, every dmr_* metric exists;
- compose.yaml: services, ports 8073/8074, depends_on, every variable on a dmr server/agent
  service is read by the code and the required ones are set, files under the PKI volume, names
  in the server certificate, broker credentials;
- k8s/: `kubectl kustomize` of the base and the example overlay, core kinds with
  kubernetes-validate (strict), operator kinds against k8s/crd-schemas/, selectors/ports/
  references between objects, the same env rules as compose, probes on routes the code serves,
  the PrometheusRule carrying exactly monitoring/alerts.yml;
- Dockerfile and .dockerignore: the essentials.

`--write-prometheusrule` regenerates k8s/base/monitoring/prometheusrule.yaml from
monitoring/alerts.yml instead of checking.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION_DEFAULT = "1.30"
PROMETHEUSRULE_PATH = ROOT / "k8s/base/monitoring/prometheusrule.yaml"

# The original README's suggested alert rules, by group (seed 000, "Suggested alert rules").
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

# Metrics the dashboard must show (connections, throughput, latency, retries, DLQ, validation, broker).
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
]

CRD_SCHEMAS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmqcluster-v1beta1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-v1.json",
}

COMPOSE_SERVICES = ["rabbitmq", "pki", "server-1", "server-2", "agent-a", "agent-b", "sink", "prometheus"]
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# ------------------------------------------------------------------------------------------------
# Results


class Results:
    def __init__(self) -> None:
        self.checks: list[tuple[str, list[str]]] = []

    def check(self, name: str, problems: list[str]) -> None:
        self.checks.append((name, problems))
        if problems:
            print(f"FAIL  {name}")
            for p in problems:
                print(f"        - {p}")
        else:
            print(f"PASS  {name}")
        sys.stdout.flush()

    @property
    def failed(self) -> list[str]:
        return [n for n, p in self.checks if p]


# ------------------------------------------------------------------------------------------------
# What the code reads and exports


class EnvSpec:
    """The variables one binary reads: all of them, the required ones, and 'one of' groups."""

    def __init__(self) -> None:
        self.allowed: set[str] = set()
        self.required: set[str] = set()
        self.one_of: list[set[str]] = []
        self.defaults: dict[str, str] = {}

    def missing(self, names: set[str]) -> list[str]:
        out = [f"required variable {v} is not set" for v in sorted(self.required - names)]
        for group in self.one_of:
            if not group & names:
                out.append("one of " + " / ".join(sorted(group)) + " must be set")
        return out

    def unknown(self, names: set[str]) -> list[str]:
        return sorted(names - self.allowed)


def _balanced(src: str, start: int) -> int:
    """Index just past the parenthesis closing the one opened before `start`."""
    depth, i, in_str = 1, start, False
    while depth:
        c = src[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        i += 1
    return i


def parse_clap_env(path: Path) -> EnvSpec:
    src = path.read_text()
    spec = EnvSpec()
    fields: list[dict] = []
    for m in re.finditer(r"#\[arg\(", src):
        end = _balanced(src, m.end())
        attr = src[m.end() : end - 1]
        env = re.search(r'\benv\s*=\s*"([^"]+)"', attr)
        if not env:
            continue
        rest = src[end:]
        fm = re.match(r"\]\s*(?:#\[[^\n]*\]\s*)*pub\s+(\w+)\s*:\s*([^\n]+?),?\s*\n", rest)
        if not fm:
            raise SystemExit(f"{path}: cannot read the field after #[arg({attr.strip()})]")
        default = re.search(r"\bdefault_values?(?:_t|_os_t|_os|_ts)?\s*=\s*(\"[^\"]*\"|[^,\n)]+)", attr)
        if default:
            value = default.group(1).strip().strip('"')
            default_value = value.replace("_", "") if re.fullmatch(r"[0-9_]+", value) else value
        else:
            default_value = None
        fields.append({
            "field": fm.group(1),
            "env": env.group(1),
            "type": fm.group(2).strip(),
            "default": default_value,
            "required_true": bool(re.search(r"\brequired\s*=\s*true", attr)),
            "unless": re.findall(r'required_unless_present\s*=\s*"([^"]+)"', attr),
        })
    env_of = {f["field"]: f["env"] for f in fields}
    for f in fields:
        name = f["env"]
        spec.allowed.add(name)
        if f["default"] is not None:
            spec.defaults[name] = f["default"]
        optional = f["type"].startswith("Option<") or f["type"] == "bool" or f["default"] is not None
        if f["unless"]:
            group = {name} | {env_of[u] for u in f["unless"] if u in env_of}
            spec.one_of.append(group)
        elif f["required_true"] or not optional:
            spec.required.add(name)
    if not spec.allowed:
        raise SystemExit(f"{path}: no clap `env = \"...\"` attributes found")
    return spec


def env_var_reads(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for p in paths:
        for src_file in sorted(p.rglob("*.rs")) if p.is_dir() else [p]:
            names |= set(re.findall(r'env::var(?:_os)?\(\s*"([A-Z0-9_]+)"\s*\)', src_file.read_text()))
    return names


def code_env() -> dict[str, EnvSpec]:
    logging_vars = env_var_reads([ROOT / "crates/dmr-cli/src/logging.rs"])
    out = {}
    for kind, crate in (("server", "dmr-server"), ("agent", "dmr-agent")):
        spec = parse_clap_env(ROOT / f"crates/{crate}/src/config.rs")
        spec.allowed |= logging_vars | env_var_reads([ROOT / f"crates/{crate}/src"])
        out[kind] = spec
    return out


def code_metrics() -> tuple[set[str], set[str]]:
    """(all metric names, histogram names) from crates/*/src/metrics.rs."""
    names, histograms = set(), set()
    ctor = re.compile(r"\b(\w*(?:istogram|ounter|auge)\w*)\s*(?:::\s*\w+\s*)?\(")
    for path in sorted(ROOT.glob("crates/*/src/metrics.rs")):
        src = path.read_text()
        for m in re.finditer(r'"(dmr_[a-z0-9_]+)"', src):
            names.add(m.group(1))
            before = list(ctor.finditer(src, 0, m.start()))
            if before and "istogram" in before[-1].group(1):
                histograms.add(m.group(1))
    return names, histograms


def metric_problems(text: str, where: str, names: set[str], histograms: set[str]) -> list[str]:
    problems = []
    for used in sorted(set(re.findall(r"\b(dmr_[a-zA-Z0-9_]+)", text))):
        if used in histograms:
            problems.append(
                f"{where}: histogram {used} used by its bare name (only _bucket/_sum/_count series exist)"
            )
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", used)
        if used in names or (base != used and base in histograms):
            continue
        problems.append(f"{where}: metric {used} is not exported by crates/*/src/metrics.rs")
    return problems


def routes(crate_src: Path) -> set[str]:
    out = set()
    for p in crate_src.rglob("*.rs"):
        out |= set(re.findall(r'\.route\(\s*"([^"]+)"', p.read_text()))
    return out


# ------------------------------------------------------------------------------------------------
# Helpers


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_yaml_all(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def labels_match(selector: dict | None, labels: dict | None) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set."""
    selector = selector or {}
    labels = labels or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            k, _, v = str(item).partition("=")
            out[k] = v
        return out
    return {str(k): ("" if v is None else str(v)) for k, v in env.items()}


def compose_command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def is_url(value: str) -> bool:
    return value.startswith("http://") or value.startswith("https://")


FILE_VARS = {"TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "TLS_CA_FILE", "AGENT_PRIVATE_KEY_FILE"}


def file_vars(env: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k in FILE_VARS or k.endswith("_FILE")}
    centops = env.get("CENTOPS_CONFIGURATION_URL")
    if centops and not is_url(centops):
        out["CENTOPS_CONFIGURATION_URL"] = centops
    return out


# ------------------------------------------------------------------------------------------------
# Monitoring


def check_alerts(res: Results, promtool: str, names: set[str], histograms: set[str]) -> dict:
    path = ROOT / "monitoring/alerts.yml"
    p = run([promtool, "check", "rules", str(path)])
    res.check("promtool check rules monitoring/alerts.yml", [] if p.returncode == 0 else [(p.stdout + p.stderr).strip()])

    doc = load_yaml(path)
    problems = []
    groups = {g["name"]: [r.get("alert") for r in g.get("rules", [])] for g in doc.get("groups", [])}
    for g, alerts in ORIGINAL_ALERTS.items():
        if g not in groups:
            problems.append(f"group {g} is missing")
        elif groups[g] != alerts:
            problems.append(f"group {g}: alerts {groups[g]} differ from the original's {alerts}")
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            for key in ("alert", "expr", "for", "labels", "annotations"):
                if key not in r:
                    problems.append(f"{g['name']}/{r.get('alert')}: no {key}")
            if (r.get("labels") or {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{g['name']}/{r.get('alert')}: severity label missing or unknown")
    res.check("monitoring/alerts.yml carries the original's alert rules", problems)
    res.check(
        "monitoring/alerts.yml: every dmr_* metric is exported by the code",
        metric_problems(path.read_text(), "alerts.yml", names, histograms),
    )
    return doc


def check_prometheus_config(res: Results, promtool: str, compose: dict | None) -> None:
    path = ROOT / "monitoring/prometheus.yml"
    p = run([promtool, "check", "config", str(path)])
    res.check("promtool check config monitoring/prometheus.yml", [] if p.returncode == 0 else [(p.stdout + p.stderr).strip()])
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
    # What each compose service serves metrics on.
    expected_port = {}
    for name, svc in services.items():
        cmd = compose_command(svc)
        env = compose_env(svc)
        if cmd[:1] == ["server"]:
            expected_port[name] = {env.get("PORT", "8075")}
        elif cmd[:1] == ["agent"]:
            expected_port[name] = {env.get("PORT", "8077")}
        elif name == "rabbitmq":
            expected_port[name] = {"15692"}
    scraped = set()
    for job in cfg.get("scrape_configs") or []:
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
    res.check("monitoring/prometheus.yml scrapes every server, agent and RabbitMQ of compose.yaml", problems)


def check_dashboard(res: Results, names: set[str], histograms: set[str]) -> None:
    path = ROOT / "monitoring/grafana-dashboard.json"
    problems: list[str] = []
    try:
        dash = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        res.check("monitoring/grafana-dashboard.json", [str(e)])
        return
    exprs = []
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p.get("id"))
            for t in p.get("targets") or []:
                if t.get("expr"):
                    exprs.append(t["expr"])
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
    problems += metric_problems(text, "dashboard", names, histograms)
    res.check("monitoring/grafana-dashboard.json: panels and metric names", problems)


# ------------------------------------------------------------------------------------------------
# compose.yaml


def pki_layout(cmd: list[str]) -> tuple[str, list[str], list[str]]:
    """(out dir, agent ids, server names) of a `dmr pki` command line."""
    out, agents, names = "pki", [], []
    i = 1
    while i < len(cmd):
        a, step = cmd[i], 2
        val = cmd[i + 1] if i + 1 < len(cmd) else ""
        if a.startswith("--") and "=" in a:
            a, val = a.split("=", 1)
            step = 1
        if a == "--out":
            out = val
        elif a == "--agent":
            agents.append(val.split("=", 1)[0].lower())
        elif a == "--server-name":
            names.append(val)
        i += step
    return out.rstrip("/"), agents, names or ["localhost", "127.0.0.1"]


def check_compose(res: Results, envs: dict[str, EnvSpec]) -> dict | None:
    path = ROOT / "compose.yaml"
    try:
        doc = load_yaml(path)
    except (OSError, yaml.YAMLError) as e:
        res.check("compose.yaml parses", [str(e)])
        return None
    services = doc.get("services") or {}
    problems = [f"service {s} is missing" for s in COMPOSE_SERVICES if s not in services]

    # depends_on
    for name, svc in services.items():
        dep = svc.get("depends_on") or {}
        items = dep.items() if isinstance(dep, dict) else [(d, {}) for d in dep]
        for target, opts in items:
            if target not in services:
                problems.append(f"{name}: depends_on {target}, which is not a service")
                continue
            cond = (opts or {}).get("condition", "service_started")
            if cond not in DEPENDS_CONDITIONS:
                problems.append(f"{name}: depends_on {target} with unknown condition {cond}")
            if cond == "service_healthy" and not (services[target].get("healthcheck") or {}).get("test"):
                problems.append(f"{name}: waits for {target} to be healthy, but {target} has no healthcheck")
    for name, svc in services.items():
        if name != "pki" and compose_command(svc)[:1] in (["server"], ["agent"]):
            cond = ((svc.get("depends_on") or {}).get("pki") or {}).get("condition")
            if cond != "service_completed_successfully":
                problems.append(f"{name}: must wait for pki with condition service_completed_successfully")
        if compose_command(svc)[:1] == ["server"]:
            cond = ((svc.get("depends_on") or {}).get("rabbitmq") or {}).get("condition")
            if cond != "service_healthy":
                problems.append(f"{name}: must wait for rabbitmq with condition service_healthy")
    res.check("compose.yaml: services and depends_on", problems)

    # published ports
    problems = []
    for svc_name, host_port in (("agent-a", "8073"), ("agent-b", "8074")):
        svc = services.get(svc_name) or {}
        container_port = compose_env(svc).get("PORT", envs["agent"].defaults.get("PORT", "8077"))
        found = False
        for p in svc.get("ports") or []:
            if isinstance(p, dict):
                hp, cp = str(p.get("published")), str(p.get("target"))
            else:
                parts = str(p).split("/")[0].split(":")
                hp, cp = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[0])
            if hp == host_port:
                found = True
                if cp != container_port:
                    problems.append(f"{svc_name}: host port {host_port} maps to {cp}, but the agent listens on {container_port}")
        if not found:
            problems.append(f"{svc_name}: REST not published on host port {host_port}")
    res.check("compose.yaml: agent A on host port 8073, agent B on 8074", problems)

    # dmr services: environment against the code
    pki_svc = services.get("pki") or {}
    pki_cmd = compose_command(pki_svc)
    problems = []
    if pki_cmd[:1] != ["pki"]:
        problems.append("service pki does not run `dmr pki`")
    out_dir, pki_agents, server_names = pki_layout(pki_cmd)
    pki_files = {f"{out_dir}/{f}" for f in ("ca.pem", "server.pem", "server-key.pem", "centops.json")}
    for a in pki_agents:
        pki_files |= {f"{out_dir}/agents/{a}/cert.pem", f"{out_dir}/agents/{a}/key.pem"}
    pki_volume = next((str(v).split(":")[0] for v in pki_svc.get("volumes") or [] if str(v).split(":")[1:2] == [out_dir]), None)
    if pki_volume is None:
        problems.append(f"service pki does not write {out_dir} into a volume")
    servers = {n: s for n, s in services.items() if compose_command(s)[:1] == ["server"]}
    agents = {n: s for n, s in services.items() if compose_command(s)[:1] == ["agent"]}
    if len(servers) < 2:
        problems.append("fewer than two `dmr server` services")
    if len(agents) < 2:
        problems.append("fewer than two `dmr agent` services")
    rabbit_env = compose_env(services.get("rabbitmq") or {})
    for name, svc in {**servers, **agents}.items():
        kind = compose_command(svc)[0]
        env = compose_env(svc)
        spec = envs[kind]
        for v in spec.unknown(set(env)):
            problems.append(f"{name}: {v} is not read by `dmr {kind}` (crates/dmr-{kind}/src/config.rs, dmr-cli logging)")
        problems += [f"{name}: {m}" for m in spec.missing(set(env))]
        if (svc.get("image") or "").split(":")[0] != (pki_svc.get("image") or "").split(":")[0]:
            problems.append(f"{name}: runs another image than pki")
        mounts = [str(v) for v in svc.get("volumes") or []]
        if not any(m.split(":")[:2] == [pki_volume, out_dir] for m in mounts):
            problems.append(f"{name}: does not mount the PKI volume at {out_dir}")
        for var, value in file_vars(env).items():
            if value not in pki_files:
                problems.append(f"{name}: {var}={value} is not a file `dmr pki` writes ({sorted(pki_files)})")
        if kind == "server":
            host = env.get("RABBITMQ_DEFAULT_HOST", spec.defaults.get("RABBITMQ_DEFAULT_HOST"))
            if host not in services:
                problems.append(f"{name}: RABBITMQ_DEFAULT_HOST={host} is not a compose service")
            for var in ("RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"):
                if env.get(var, "guest") != rabbit_env.get(var, "guest"):
                    problems.append(f"{name}: {var} differs from the rabbitmq service's")
        else:
            agent_id = env.get("AGENT_ID", "")
            if agent_id.lower() not in pki_agents:
                problems.append(f"{name}: AGENT_ID {agent_id} is not one of the pki --agent ids")
            for var in ("AGENT_PRIVATE_KEY_FILE", "TLS_CERT_FILE"):
                if var in env and f"/agents/{agent_id}/" not in env[var]:
                    problems.append(f"{name}: {var} is not agent {agent_id}'s")
            urls = [u.strip() for u in env.get("DMR_SERVER_GRPC_URL", "").split(",") if u.strip()]
            for u in urls:
                pu = urlparse(u)
                target = servers.get(pu.hostname or "")
                if pu.scheme != "https":
                    problems.append(f"{name}: {u} is not https")
                if target is None:
                    problems.append(f"{name}: {u} does not name a `dmr server` service")
                elif str(pu.port) != compose_env(target).get("GRPC_PORT", envs["server"].defaults.get("GRPC_PORT")):
                    problems.append(f"{name}: {u} does not use {pu.hostname}'s GRPC_PORT")
                tls_name = env.get("DMR_SERVER_TLS_NAME", pu.hostname)
                if tls_name not in server_names:
                    problems.append(f"{name}: {tls_name} is not in the server certificate (pki --server-name {server_names})")
            if set(urls) and {urlparse(u).hostname for u in urls} != set(servers):
                problems.append(f"{name}: DMR_SERVER_GRPC_URL does not list every server ({sorted(servers)})")
            endpoint = urlparse(env.get("OUTGOING_MESSAGE_ENDPOINT", ""))
            if endpoint.hostname not in services:
                problems.append(f"{name}: OUTGOING_MESSAGE_ENDPOINT host {endpoint.hostname} is not a compose service")
    res.check("compose.yaml: dmr server/agent environment matches what the code reads", problems)

    # RabbitMQ: prometheus plugin and healthcheck
    problems = []
    rabbit = services.get("rabbitmq") or {}
    if not str(rabbit.get("image", "")).startswith("rabbitmq:3-management"):
        problems.append("rabbitmq image is not rabbitmq:3-management")
    plugins = ""
    for v in rabbit.get("volumes") or []:
        src, _, rest = str(v).partition(":")
        if rest.startswith("/etc/rabbitmq/enabled_plugins"):
            plugins = (ROOT / src).read_text() if (ROOT / src).exists() else ""
    if "rabbitmq_prometheus" not in plugins + " ".join(compose_command(rabbit)):
        problems.append("rabbitmq_prometheus is not enabled (enabled_plugins mount or command)")
    if not (rabbit.get("healthcheck") or {}).get("test"):
        problems.append("rabbitmq has no healthcheck")
    res.check("compose.yaml: RabbitMQ with the Prometheus plugin and a healthcheck", problems)
    return doc


# ------------------------------------------------------------------------------------------------
# Kubernetes


def render(kubectl: str, path: str) -> tuple[list[dict] | None, str]:
    p = run([kubectl, "kustomize", str(ROOT / path)])
    if p.returncode != 0:
        return None, (p.stdout + p.stderr).strip()
    return load_yaml_all(p.stdout), ""


def validate_docs(res: Results, docs: list[dict], label: str, k8s_version: str) -> None:
    import jsonschema
    import kubernetes_validate

    problems = []
    schemas = {}
    for key, fname in CRD_SCHEMAS.items():
        schema = json.loads((ROOT / "k8s/crd-schemas" / fname).read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        schemas[key] = jsonschema.Draft7Validator(schema)
    crd_kinds = {k for _, k in CRD_SCHEMAS}
    counted = {"core": 0, "crd": 0}
    for d in docs:
        kind, api = d.get("kind"), d.get("apiVersion")
        ident = f"{kind}/{(d.get('metadata') or {}).get('name')}"
        if (api, kind) in schemas:
            errs = sorted(schemas[(api, kind)].iter_errors(d), key=lambda e: list(e.absolute_path))
            for e in errs:
                where = "/".join(str(x) for x in e.absolute_path)
                problems.append(f"{ident}: {where}: {e.message}")
            counted["crd"] += 1
        elif kind in crd_kinds:
            problems.append(f"{ident}: apiVersion {api} has no vendored schema")
        else:
            try:
                kubernetes_validate.validate(d, k8s_version, strict=True)
                counted["core"] += 1
            except kubernetes_validate.ValidationError as e:
                where = "/".join(str(x) for x in e.path)
                problems.append(f"{ident}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{ident}: no Kubernetes {k8s_version} schema ({e})")
    res.check(
        f"k8s {label}: {counted['core']} core objects valid for Kubernetes {k8s_version} (strict), "
        f"{counted['crd']} operator objects valid against k8s/crd-schemas",
        problems,
    )


def operator_objects(docs: list[dict]) -> tuple[list[dict], list[dict], set[str]]:
    """Pods, Services and Secrets the RabbitMQ Cluster Operator creates for each RabbitmqCluster."""
    pods, services, secrets = [], [], set()
    for d in docs:
        if d.get("kind") != "RabbitmqCluster":
            continue
        name = d["metadata"]["name"]
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "rabbitmq", "app.kubernetes.io/part-of": "rabbitmq"}
        pods.append({"labels": labels, "ports": {"amqp": 5672, "management": 15672, "prometheus": 15692, "epmd": 4369, "cluster-links": 25672}})
        services.append({"metadata": {"name": name, "labels": labels}, "spec": {"ports": [{"name": n, "port": p} for n, p in (("amqp", 5672), ("management", 15672), ("prometheus", 15692))]}})
        services.append({"metadata": {"name": f"{name}-nodes", "labels": labels}, "spec": {"ports": [{"name": "epmd", "port": 4369}, {"name": "cluster-links", "port": 25672}]}})
        secrets.add(f"{name}-default-user")
    return pods, services, secrets


def check_k8s_consistency(res: Results, docs: list[dict], label: str, envs: dict[str, EnvSpec], alerts: dict, overlay: bool) -> None:
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: d for d in by_kind.get("Secret", [])}
    op_pods, op_services, op_secrets = operator_objects(docs)

    templates = []  # (owner, labels, {port name: number}, pod spec)
    for d in by_kind.get("Deployment", []) + by_kind.get("StatefulSet", []):
        spec = d["spec"]
        tlabels = spec["template"]["metadata"].get("labels") or {}
        if not labels_match(spec.get("selector"), tlabels):
            problems.append(f"{d['kind']}/{d['metadata']['name']}: selector does not match its pod template")
        ports = {}
        for c in spec["template"]["spec"].get("containers", []):
            for p in c.get("ports") or []:
                if p.get("name"):
                    ports[p["name"]] = p["containerPort"]
        templates.append((f"{d['kind']}/{d['metadata']['name']}", tlabels, ports, spec["template"]["spec"]))
    all_pods = [(o, l, p) for o, l, p, _ in templates] + [("RabbitmqCluster pods", p["labels"], p["ports"]) for p in op_pods]

    def selects(selector, where):
        hits = [t for t in all_pods if labels_match(selector, t[1])]
        if not hits:
            problems.append(f"{where}: selector {selector} matches no pods")
        return hits

    # Services: selectors and target ports
    for s in by_kind.get("Service", []):
        name = f"Service/{s['metadata']['name']}"
        hits = selects({"matchLabels": s["spec"].get("selector") or {}}, name)
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            for owner, _, ports in hits:
                if isinstance(tp, str) and tp not in ports:
                    problems.append(f"{name}: targetPort {tp} is not a named port of {owner}")
                if isinstance(tp, int) and tp not in ports.values():
                    problems.append(f"{name}: targetPort {tp} is not a port of {owner}")
    for d in by_kind.get("PodDisruptionBudget", []):
        selects(d["spec"].get("selector"), f"PodDisruptionBudget/{d['metadata']['name']}")
    for d in by_kind.get("NetworkPolicy", []):
        name = f"NetworkPolicy/{d['metadata']['name']}"
        if d["spec"].get("podSelector"):
            selects(d["spec"]["podSelector"], name)
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for rule in d["spec"].get(direction) or []:
                for peer in rule.get(key) or []:
                    if peer.get("podSelector") and "namespaceSelector" not in peer:
                        selects(peer["podSelector"], f"{name} {direction} peer")
    services = by_kind.get("Service", []) + op_services
    for d in by_kind.get("ServiceMonitor", []):
        name = f"ServiceMonitor/{d['metadata']['name']}"
        hits = [s for s in services if labels_match(d["spec"].get("selector"), s["metadata"].get("labels"))]
        if not hits:
            problems.append(f"{name}: selects no Service")
        for ep in d["spec"].get("endpoints", []):
            if ep.get("port") and not any(ep["port"] in [p.get("name") for p in s["spec"]["ports"]] for s in hits):
                problems.append(f"{name}: no selected Service has a port named {ep['port']}")

    # References to ConfigMaps and Secrets
    def ref_secret(n, where):
        if n in secrets or n in op_secrets:
            return
        if overlay:
            problems.append(f"{where}: Secret {n} is neither rendered nor created by an operator")

    def ref_configmap(n, where):
        if n not in configmaps:
            problems.append(f"{where}: ConfigMap {n} is not rendered")

    route_sets = {"server": routes(ROOT / "crates/dmr-server/src"), "agent": routes(ROOT / "crates/dmr-agent/src")}
    for owner, _, ports, pod in templates:
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for v in volumes.values():
            if "secret" in v:
                ref_secret(v["secret"]["secretName"], owner)
            if "configMap" in v:
                ref_configmap(v["configMap"]["name"], owner)
        for c in pod.get("containers", []):
            where = f"{owner} container {c['name']}"
            env: dict[str, str | None] = {}
            for ef in c.get("envFrom") or []:
                if "configMapRef" in ef:
                    n = ef["configMapRef"]["name"]
                    ref_configmap(n, where)
                    env.update((configmaps.get(n) or {}).get("data") or {})
                if "secretRef" in ef:
                    n = ef["secretRef"]["name"]
                    ref_secret(n, where)
                    env.update({k: None for k in ((secrets.get(n) or {}).get("data") or {})})
            for e in c.get("env") or []:
                env[e["name"]] = e.get("value")
                ref = (e.get("valueFrom") or {})
                if "secretKeyRef" in ref:
                    ref_secret(ref["secretKeyRef"]["name"], where)
                if "configMapKeyRef" in ref:
                    ref_configmap(ref["configMapKeyRef"]["name"], where)
            args = c.get("args") or []
            kind = args[0] if args and args[0] in ("server", "agent") else None
            if kind is None:
                continue
            spec = envs[kind]
            for v in spec.unknown(set(env)):
                problems.append(f"{where}: {v} is not read by `dmr {kind}` (crates/dmr-{kind}/src/config.rs, dmr-cli logging)")
            problems += [f"{where}: {m}" for m in spec.missing(set(env))]
            # files in mounted Secrets/ConfigMaps
            mounts = c.get("volumeMounts") or []
            for var, value in file_vars({k: v for k, v in env.items() if v is not None}).items():
                m = next((m for m in mounts if value.startswith(m["mountPath"].rstrip("/") + "/")), None)
                if m is None:
                    problems.append(f"{where}: {var}={value} is not under a volumeMount")
                    continue
                rel = value[len(m["mountPath"].rstrip("/")) + 1 :]
                vol = volumes.get(m["name"]) or {}
                src = vol.get("secret") or vol.get("configMap")
                if not src:
                    continue
                keys = None
                if "secret" in vol and vol["secret"]["secretName"] in secrets:
                    keys = set((secrets[vol["secret"]["secretName"]].get("data") or {}) | (secrets[vol["secret"]["secretName"]].get("stringData") or {}))
                if "configMap" in vol and vol["configMap"]["name"] in configmaps:
                    keys = set(configmaps[vol["configMap"]["name"]].get("data") or {})
                if src.get("items"):
                    keys = {i["path"] for i in src["items"]}
                if keys is not None and rel not in keys:
                    problems.append(f"{where}: {var}={value}, but the mounted volume {m['name']} has only {sorted(keys)}")
            # ports and probes against the code
            port_env = env.get("PORT") or spec.defaults.get("PORT")
            if str(ports.get("http")) != str(port_env):
                problems.append(f"{where}: container port http is {ports.get('http')}, PORT is {port_env}")
            if kind == "server":
                grpc = env.get("GRPC_PORT") or spec.defaults.get("GRPC_PORT")
                if str(ports.get("grpc")) != str(grpc):
                    problems.append(f"{where}: container port grpc is {ports.get('grpc')}, GRPC_PORT is {grpc}")
            want = {"server": {"livenessProbe": "/health", "readinessProbe": "/ready"}, "agent": {"livenessProbe": "/v1/health", "readinessProbe": "/ready"}}[kind]
            for probe, path in want.items():
                hg = (c.get(probe) or {}).get("httpGet") or {}
                if hg.get("path") != path:
                    problems.append(f"{where}: {probe} should GET {path}")
                if hg.get("path") and hg["path"] not in route_sets[kind]:
                    problems.append(f"{where}: {probe} path {hg['path']} is not a route of dmr {kind}")
                if hg.get("port") not in ("http", ports.get("http")):
                    problems.append(f"{where}: {probe} is not on the HTTP port")
            sc = c.get("securityContext") or {}
            psc = pod.get("securityContext") or {}
            if not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{where}: readOnlyRootFilesystem is not set")
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not set")
            if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
                problems.append(f"{where}: resources requests/limits missing")
    for d in by_kind.get("Deployment", []):
        args = ((d["spec"]["template"]["spec"].get("containers") or [{}])[0].get("args") or [""])[0]
        if args == "server":
            if d["spec"].get("replicas", 1) < 2:
                problems.append(f"Deployment/{d['metadata']['name']}: fewer than 2 server replicas")
            if "terminationGracePeriodSeconds" not in d["spec"]["template"]["spec"]:
                problems.append(f"Deployment/{d['metadata']['name']}: no terminationGracePeriodSeconds")
            if not any(labels_match(p["spec"].get("selector"), d["spec"]["template"]["metadata"]["labels"]) for p in by_kind.get("PodDisruptionBudget", [])):
                problems.append(f"Deployment/{d['metadata']['name']}: no PodDisruptionBudget")
        if args == "agent" and d["spec"].get("replicas", 1) != 1:
            problems.append(f"Deployment/{d['metadata']['name']}: an agent id must run as exactly one replica")

    # RabbitMQ cluster
    rcs = by_kind.get("RabbitmqCluster", [])
    if len(rcs) != 1 or rcs[0]["spec"].get("replicas") != 3:
        problems.append("expected one RabbitmqCluster with 3 replicas")

    # PrometheusRule = monitoring/alerts.yml
    rules = by_kind.get("PrometheusRule", [])
    if len(rules) != 1:
        problems.append(f"expected one PrometheusRule, found {len(rules)}")
    elif rules[0]["spec"].get("groups") != alerts.get("groups"):
        problems.append(
            "PrometheusRule groups differ from monitoring/alerts.yml "
            "(regenerate: python3 scripts/check_deploy.py --write-prometheusrule)"
        )
    for kind in ("ServiceMonitor",):
        if not by_kind.get(kind):
            problems.append(f"no {kind}")
    if not by_kind.get("NetworkPolicy"):
        problems.append("no NetworkPolicy")
    if overlay:
        ns = {(d.get("metadata") or {}).get("namespace") for d in docs if d["kind"] != "Namespace"}
        if len(ns) != 1 or None in ns:
            problems.append(f"objects are not all in one namespace: {sorted(str(n) for n in ns)}")
    res.check(f"k8s {label}: references, selectors, ports, probes, env vs code, PrometheusRule = alerts.yml", problems)


def prometheusrule_text(alerts: dict) -> str:
    header = (
        "# GENERATED from monitoring/alerts.yml by `python3 scripts/check_deploy.py --write-prometheusrule`;\n"
        "# edit monitoring/alerts.yml and regenerate (scripts/check-deploy.sh fails when they differ).\n"
    )
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "dmr-alerts", "labels": {"app.kubernetes.io/name": "dmr"}},
        "spec": {"groups": copy.deepcopy(alerts["groups"])},
    }

    class Dumper(yaml.SafeDumper):
        pass

    def str_presenter(dumper, data):
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, str_presenter)
    return header + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=120, default_flow_style=False)


# ------------------------------------------------------------------------------------------------
# Dockerfile


def check_dockerfile(res: Results) -> None:
    problems = []
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"(?im)^FROM\s", text)
    final = stages[-1] if len(stages) > 1 else ""
    if len(stages) < 3:
        problems.append("not multi-stage")
    if not re.search(r"cargo build --release[^\n]*-p dmr-cli", text):
        problems.append("no `cargo build --release ... -p dmr-cli`")
    user = re.findall(r"(?im)^USER\s+(\S+)", final)
    if not user or user[-1].split(":")[0] in ("root", "0"):
        problems.append("the runtime stage does not switch to a non-root USER")
    if not re.search(r'(?im)^ENTRYPOINT\s+\["dmr"\]', final):
        problems.append('the runtime stage has no ENTRYPOINT ["dmr"]')
    if "/usr/local/bin/dmr" not in final:
        problems.append("the binary is not installed as /usr/local/bin/dmr")
    ignore = {l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in ("target", ".dmr-dev", "tests/node/node_modules", ".git"):
        if entry not in ignore:
            problems.append(f".dockerignore does not exclude {entry}")
    res.check("Dockerfile / .dockerignore", problems)


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    ap.add_argument("--promtool", default=os.environ.get("PROMTOOL", "promtool"))
    ap.add_argument("--k8s-version", default=K8S_VERSION_DEFAULT)
    ap.add_argument("--write-prometheusrule", action="store_true")
    args = ap.parse_args()

    alerts = load_yaml(ROOT / "monitoring/alerts.yml")
    if args.write_prometheusrule:
        PROMETHEUSRULE_PATH.write_text(prometheusrule_text(alerts))
        print(f"wrote {PROMETHEUSRULE_PATH.relative_to(ROOT)}")
        return 0

    res = Results()
    print("== code: variables read and metrics exported")
    envs = code_env()
    names, histograms = code_metrics()
    problems = []
    for must in ("dmr_socket_connections_active", "dmr_agent_socket_connection_active", "dmr_message_processing_duration_seconds"):
        if must not in names:
            problems.append(f"{must} not found in crates/*/src/metrics.rs (parser or code changed)")
    if "dmr_message_processing_duration_seconds" not in histograms:
        problems.append("histogram detection failed for dmr_message_processing_duration_seconds")
    for kind, spec in envs.items():
        print(f"        dmr {kind}: reads {len(spec.allowed)} variables; required {sorted(spec.required)}"
              + "".join(f"; one of {sorted(g)}" for g in spec.one_of))
    print(f"        metrics: {len(names)} names, histograms {sorted(histograms)}")
    res.check("code parsed (config.rs env attributes, metrics.rs names)", problems)

    print("== monitoring")
    alerts = check_alerts(res, args.promtool, names, histograms)
    check_dashboard(res, names, histograms)

    print("== compose.yaml")
    compose = check_compose(res, envs)
    check_prometheus_config(res, args.promtool, compose)

    print("== Dockerfile")
    check_dockerfile(res)

    print("== k8s")
    for label, path, overlay in (("base", "k8s/base", False), ("overlays/example", "k8s/overlays/example", True)):
        docs, err = render(args.kubectl, path)
        res.check(f"kubectl kustomize {path}", [err] if docs is None else [])
        if docs is None:
            continue
        validate_docs(res, docs, label, args.k8s_version)
        check_k8s_consistency(res, docs, label, envs, alerts, overlay)
        if overlay:
            rule = next((d for d in docs if d["kind"] == "PrometheusRule"), None)
            if rule:
                with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
                    yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
                p = run([args.promtool, "check", "rules", f.name])
                os.unlink(f.name)
                res.check("promtool check rules (the rendered PrometheusRule)", [] if p.returncode == 0 else [(p.stdout + p.stderr).strip()])

    failed = res.failed
    print()
    print(f"check-deploy: {len(res.checks) - len(failed)} passed, {len(failed)} failed")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    print("PASS: deployment files are consistent with each other and with the code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
