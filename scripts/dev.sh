#!/usr/bin/env bash
# Runs the complete local relay (server, agents A and B, a sink printing what arrives) against the
# local RabbitMQ, starting or installing the broker first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-rabbitmq.sh >&2
exec cargo run --quiet -p dmr-cli -- dev "$@"
