#!/usr/bin/env python3
"""Checks the deployment files (Dockerfile, compose.yaml, monitoring/, k8s/) against each other and
against the code. Run through `bash scripts/check-deploy.sh`, which installs the tools and builds
the `dmr` binary, and passes their paths.

Generic policy is left to maintained tools: hadolint and checkov (Dockerfile, Kubernetes),
kubernetes-validate and the vendored CRD schemas (object schemas), promtool (rule and config syntax,
rule unit tests in monitoring/tests/). What stays here is specific to this project (modules in
scripts/deploy_check/):
- code.py: the settings `dmr server|agent --print-env` lists (generated from the code's clap
  definitions), metric names (crates/*/src/metrics.rs; RabbitMQ's from a captured real scrape),
  HTTP routes;
- monitoring.py: the original's alert names, a unit test per rule, every metric a rule or panel
  uses exists, the Prometheus jobs the rules select on, the dashboard's required panels;
- compose.py / k8s.py: every variable set is one the binary reads and the required ones are set,
  files named are written by `dmr pki` or mounted, ports and probes match the code, replicas fit
  the design, the PrometheusRule carries exactly monitoring/alerts.yml;
- policy.py: hadolint, checkov, and the image runs dmr on the code's ports.

`--write-prometheusrule` regenerates k8s/base/monitoring/prometheusrule.yaml from
monitoring/alerts.yml instead of checking.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deploy_check import compose, k8s, monitoring, policy  # noqa: E402
from deploy_check.code import Metrics, code_env  # noqa: E402
from deploy_check.common import ROOT, Results, load_yaml, output_problem, run  # noqa: E402

K8S_VERSION_DEFAULT = "1.30"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dmr", default=os.environ.get("DMR_BIN"), help="the built dmr binary")
    ap.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    ap.add_argument("--promtool", default=os.environ.get("PROMTOOL", "promtool"))
    ap.add_argument("--checkov", default="checkov")
    ap.add_argument("--hadolint", default="hadolint")
    ap.add_argument("--k8s-version", default=K8S_VERSION_DEFAULT)
    ap.add_argument("--write-prometheusrule", action="store_true")
    args = ap.parse_args()

    alerts = load_yaml(ROOT / "monitoring/alerts.yml")
    if args.write_prometheusrule:
        k8s.PROMETHEUSRULE_PATH.write_text(k8s.prometheusrule_text(alerts))
        print(f"wrote {k8s.PROMETHEUSRULE_PATH.relative_to(ROOT)}")
        return 0
    if not args.dmr:
        ap.error("--dmr (or DMR_BIN) is required: the built dmr binary")

    res = Results()
    print("== code: settings (dmr --print-env), metrics, routes")
    envs = code_env(args.dmr)
    metrics = Metrics()
    problems = []
    for kind, want in (("server", {"PORT", "GRPC_PORT", "TLS_CERT_FILE", "LOGGER_LOG_LEVELS"}), ("agent", {"PORT", "AGENT_ID"})):
        problems += [f"`dmr {kind} --print-env` does not list {v}" for v in sorted(want - envs[kind].allowed)]
    for must in ("dmr_socket_connections_active", "dmr_agent_socket_connection_active"):
        if must not in metrics.names:
            problems.append(f"{must} not found in crates/*/src/metrics.rs (parser or code changed)")
    if "dmr_message_processing_duration_seconds" not in metrics.histograms:
        problems.append("histogram detection failed for dmr_message_processing_duration_seconds")
    if "rabbitmq_identity_info" not in metrics.rabbit:
        problems.append("no captured RabbitMQ scrape in monitoring/tests/fixtures/")
    for kind, spec in envs.items():
        print(f"        dmr {kind}: reads {len(spec.allowed)} variables; required {sorted(spec.required)}"
              + "".join(f"; one of {sorted(g)}" for g in spec.one_of))
    print(f"        metrics: {len(metrics.names)} dmr names, {len(metrics.rabbit)} RabbitMQ names")
    res.check("code read (print-env, metrics.rs, RabbitMQ scrape)", problems)

    print("== monitoring")
    alerts = monitoring.check_alerts(res, args.promtool, metrics)
    monitoring.check_dashboard(res, metrics)

    print("== compose.yaml")
    doc = compose.check_compose(res, envs)
    monitoring.check_prometheus_config(res, args.promtool, doc)

    print("== Dockerfile")
    policy.check_hadolint(res, args.hadolint)
    policy.check_checkov_dockerfile(res, args.checkov)
    policy.check_image(res, envs)

    print("== k8s")
    for label, path, overlay in (("base", "k8s/base", False), ("overlays/example", "k8s/overlays/example", True)):
        docs, err = k8s.render(args.kubectl, path)
        res.check(f"kubectl kustomize {path}", [err] if docs is None else [])
        if docs is None:
            continue
        k8s.validate_docs(res, docs, label, args.k8s_version)
        k8s.check_k8s_consistency(res, docs, label, envs, alerts, overlay)
        if overlay:
            # The deployable form: generic policy on what would be applied.
            policy.check_checkov_k8s(res, args.checkov, label, docs)
            rule = next((d for d in docs if d["kind"] == "PrometheusRule"), None)
            if rule:
                with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
                    yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
                p = run([args.promtool, "check", "rules", f.name])
                os.unlink(f.name)
                res.check("promtool check rules (the rendered PrometheusRule)", output_problem(p))

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
