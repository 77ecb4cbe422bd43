"""What the code reads and exports: the settings `dmr server|agent --print-env` lists (generated
from the clap definitions, so nothing here parses Rust for them), the metric names of
crates/*/src/metrics.rs, the HTTP routes, and RabbitMQ's real metric names (captured scrapes in
monitoring/tests/fixtures/)."""

from __future__ import annotations

import re
from pathlib import Path

from .common import ROOT, run

RABBITMQ_FIXTURES = ROOT / "monitoring/tests/fixtures"


class EnvSpec:
    """The variables one binary reads: all of them, the required ones, 'one of' groups, defaults."""

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


def parse_print_env(text: str) -> EnvSpec:
    """Reads the output of `dmr <kind> --print-env` (format: crates/dmr-cli/src/print_env.rs)."""
    spec = EnvSpec()
    marks: list[str] = []
    groups: dict[frozenset, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            marks.append(line[1:].strip())
            continue
        if not line.strip():
            marks = []
            continue
        name, sep, default = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise ValueError(f"not a NAME=value line: {line!r}")
        spec.allowed.add(name)
        if default:
            spec.defaults[name] = default
        for m in marks:
            if m == "required":
                spec.required.add(name)
            elif m.startswith("required unless one of:"):
                members = frozenset(m.split(":", 1)[1].split())
                groups.setdefault(members, set(members))
        marks = []
    spec.one_of = list(groups.values())
    return spec


def code_env(dmr: str) -> dict[str, EnvSpec]:
    out = {}
    for kind in ("server", "agent"):
        # A clean environment: the listing must not depend on (or leak) what is set here.
        p = run([dmr, kind, "--print-env"], env={"PATH": "/usr/bin:/bin"})
        if p.returncode != 0:
            raise SystemExit(f"`{dmr} {kind} --print-env` failed: {(p.stdout + p.stderr).strip()}")
        out[kind] = parse_print_env(p.stdout)
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


def rabbitmq_metrics() -> set[str]:
    """Every series name in the captured rabbitmq_prometheus scrapes."""
    names = set()
    for path in sorted(RABBITMQ_FIXTURES.glob("rabbitmq-*.prom")):
        for line in path.read_text().splitlines():
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", line)
            if m and not line.startswith("#"):
                names.add(m.group(1))
    return names


def metric_problems(exprs: list[str], where: str, names: set[str], histograms: set[str], rabbit: set[str]) -> list[str]:
    """Every dmr_* / rabbitmq_* series an expression names exists where it comes from (`$name` is a
    dashboard variable, not a series)."""
    problems = []
    text = "\n".join(exprs)
    for used in sorted(set(re.findall(r"(?<![$\w])(dmr_[a-zA-Z0-9_]+)", text))):
        if used in histograms:
            problems.append(f"{where}: histogram {used} used by its bare name (only _bucket/_sum/_count series exist)")
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", used)
        if used in names or (base != used and base in histograms):
            continue
        problems.append(f"{where}: metric {used} is not exported by crates/*/src/metrics.rs")
    for used in sorted(set(re.findall(r"(?<![$\w])(rabbitmq_[a-zA-Z0-9_]+)", text))):
        if used not in rabbit:
            problems.append(
                f"{where}: metric {used} is not exported by RabbitMQ's rabbitmq_prometheus plugin "
                f"(not in {RABBITMQ_FIXTURES.relative_to(ROOT)}/)"
            )
    return problems


def routes(crate_src: Path) -> set[str]:
    out = set()
    for p in crate_src.rglob("*.rs"):
        out |= set(re.findall(r'\.route\(\s*"([^"]+)"', p.read_text()))
    return out


class Metrics:
    """Every metric name a rule or panel may use."""

    def __init__(self) -> None:
        self.names, self.histograms = code_metrics()
        self.rabbit = rabbitmq_metrics()

    def problems(self, exprs: list[str], where: str) -> list[str]:
        return metric_problems(exprs, where, self.names, self.histograms, self.rabbit)
