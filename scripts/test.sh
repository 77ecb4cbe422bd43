#!/usr/bin/env bash
# The whole test suite, as CI runs it: a broker, the test tooling (npm: jose, socket.io-client, buf;
# PyPI: grpcurl, schemathesis; Debian: prometheus), proto lint, deployment-file checks, formatting,
# clippy, and every Rust test (unit, end-to-end against real RabbitMQ and mTLS, interop with the real
# jose and socket.io-client packages, fault injection, operability).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-rabbitmq.sh

if ! command -v npm >/dev/null 2>&1; then
  echo "npm is missing; installing Debian's nodejs and npm" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
# `npm install` (not `npm ci`): npm 11 flags the lock file as out of sync over buf's optional
# per-platform packages; the versions are pinned exactly in package.json and the lock file.
npm install --prefix tests/node --no-audit --no-fund --loglevel=error

# shellcheck source=scripts/test-tools.sh
source scripts/test-tools.sh

echo "== buf lint"
(cd "$(pwd)" && tests/node/node_modules/.bin/buf lint)
echo "== buf breaking (proto/ against the released contract in proto-release/)"
tests/node/node_modules/.bin/buf breaking --against proto-release
echo "== deployment files (compose, k8s, monitoring)"
bash scripts/check-deploy.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
# The process-level tests (fault injection, log audit) run the `dmr` binary itself; cargo does not
# build another package's binary for integration tests, so build it first.
cargo build --quiet -p dmr-cli
log="$(mktemp)"
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the last often for doc tests).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
rm -f "$log"
exit "$status"
