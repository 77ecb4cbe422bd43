"""k8s/: `kubectl kustomize` renders, core kinds valid (kubernetes-validate, strict), operator kinds
valid against k8s/crd-schemas/, and the project's rules: the variables each container sets are ones
`dmr` reads (required ones set, files under mounted Secrets/ConfigMaps), container ports equal the
ports the code listens on, probes hit routes the code serves, Services and ServiceMonitors reach
those ports, replicas fit the design (servers >= 2 with a PDB, one pod per agent id, three RabbitMQ
nodes), and the PrometheusRule carries exactly monitoring/alerts.yml. Generic policy (security
context, resources, probes present, NetworkPolicies) is checkov's (see policy.py)."""

from __future__ import annotations

import copy
import json

import yaml

from .code import EnvSpec, routes
from .common import ROOT, Results, file_vars, load_yaml_all, run

PROMETHEUSRULE_PATH = ROOT / "k8s/base/monitoring/prometheusrule.yaml"

CRD_SCHEMAS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmqcluster-v1beta1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-v1.json",
}


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
                problems.append(f"{where}: {v} is not read by `dmr {kind}` (`dmr {kind} --print-env`)")
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
    if not by_kind.get("ServiceMonitor"):
        problems.append("no ServiceMonitor")
    if overlay:
        ns = {(d.get("metadata") or {}).get("namespace") for d in docs if d["kind"] != "Namespace"}
        if len(ns) != 1 or None in ns:
            problems.append(f"objects are not all in one namespace: {sorted(str(n) for n in ns)}")
    res.check(f"k8s {label}: env vs code, ports, probes on routes, Services/ServiceMonitors select the pods, PrometheusRule = alerts.yml", problems)


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
