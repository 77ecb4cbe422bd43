"""Generic policy by maintained tools, and what is specific to this project's image.

- hadolint (the Dockerfile linter; settings and ignored rules with reasons in .hadolint.yaml);
- checkov (Dockerfile and Kubernetes policy: non-root, read-only root filesystem, resources,
  probes, privilege escalation, capabilities, NetworkPolicies, service-account tokens, ...; run on
  the rendered example overlay, the deployable form; skipped checks with reasons in .checkov.yaml);
- the image runs the `dmr` binary built from dmr-cli and exposes the ports the code listens on.
"""

from __future__ import annotations

import json
import re
import tempfile

import yaml

from .code import EnvSpec
from .common import ROOT, Results, output_problem, run


def check_hadolint(res: Results, hadolint: str) -> None:
    p = run([hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")])
    res.check("hadolint Dockerfile (.hadolint.yaml)", output_problem(p))


def checkov(checkov_bin: str, framework: str, path: str) -> list[str]:
    """Failed checks of one file, as problems. --skip-download: no calls to the vendor's API."""
    p = run([
        checkov_bin, "--config-file", str(ROOT / ".checkov.yaml"), "--framework", framework, "-f", path,
        "--skip-download", "--quiet", "--compact", "--output", "json",
    ])
    try:
        out = json.loads(p.stdout) if p.stdout.strip() else {}
    except ValueError:
        return [f"checkov did not answer JSON (exit {p.returncode}): {(p.stdout + p.stderr).strip()[:2000]}"]
    reports = out if isinstance(out, list) else [out]
    problems = []
    for r in reports:
        for c in (r.get("results") or {}).get("failed_checks") or []:
            problems.append(f"{c['check_id']} {c['check_name']}: {c.get('resource')} ({c.get('file_path')})")
    if p.returncode not in (0, 1) or (p.returncode == 1 and not problems):
        problems.append(f"checkov failed (exit {p.returncode}): {p.stderr.strip()[:2000]}")
    return problems


def check_checkov_dockerfile(res: Results, checkov_bin: str) -> None:
    res.check("checkov Dockerfile (.checkov.yaml)", checkov(checkov_bin, "dockerfile", str(ROOT / "Dockerfile")))


def check_checkov_k8s(res: Results, checkov_bin: str, label: str, docs: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/rendered.yaml"
        with open(path, "w") as f:
            yaml.safe_dump_all(docs, f)
        res.check(f"checkov k8s {label} (.checkov.yaml)", checkov(checkov_bin, "kubernetes", path))


def check_image(res: Results, envs: dict[str, EnvSpec]) -> None:
    problems = []
    text = (ROOT / "Dockerfile").read_text()
    final = re.split(r"(?im)^FROM\s", text)[-1]
    if not re.search(r"cargo build --release[^\n]*-p dmr-cli", text):
        problems.append("no `cargo build --release ... -p dmr-cli`")
    if not re.search(r'(?im)^ENTRYPOINT\s+\["dmr"\]', final):
        problems.append('the runtime stage has no ENTRYPOINT ["dmr"]')
    if "/usr/local/bin/dmr" not in final:
        problems.append("the binary is not installed as /usr/local/bin/dmr")
    exposed = set(re.findall(r"\b(\d+)\b", " ".join(re.findall(r"(?im)^EXPOSE\s+([^\n]+)", final))))
    listens = {envs["server"].defaults.get("PORT"), envs["server"].defaults.get("GRPC_PORT"), envs["agent"].defaults.get("PORT")}
    if exposed != listens:
        problems.append(f"EXPOSE {sorted(exposed)}, but the code's default ports are {sorted(p for p in listens if p)}")
    ignore = {l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in ("target", ".dmr-dev", "tests/node/node_modules", ".git"):
        if entry not in ignore:
            problems.append(f".dockerignore does not exclude {entry} (build context size, secrets of dmr dev)")
    res.check("Dockerfile: builds and runs dmr, exposes the code's ports", problems)
