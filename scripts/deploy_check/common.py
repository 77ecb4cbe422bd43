"""Shared helpers: where the repository is, the result list, YAML and subprocess helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent


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


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_yaml_all(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def output_problem(p: subprocess.CompletedProcess) -> list[str]:
    """[] if the command succeeded, else its output as one problem."""
    return [] if p.returncode == 0 else [(p.stdout + p.stderr).strip() or f"exit status {p.returncode}"]


FILE_VARS = {"TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "TLS_CA_FILE", "AGENT_PRIVATE_KEY_FILE"}


def is_url(value: str) -> bool:
    return value.startswith("http://") or value.startswith("https://")


def file_vars(env: dict[str, str]) -> dict[str, str]:
    """The variables of an environment that name files (and a CentOps source that is a file)."""
    out = {k: v for k, v in env.items() if k in FILE_VARS or k.endswith("_FILE")}
    centops = env.get("CENTOPS_CONFIGURATION_URL")
    if centops and not is_url(centops):
        out["CENTOPS_CONFIGURATION_URL"] = centops
    return out
