#!/usr/bin/env bash
# Runs the complete local relay (server, agents A and B, a sink printing what arrives). The broker is
# the embedded one (queues on disk in .dmr-dev/queues): nothing to install. With BROKER=rabbitmq it
# uses the local RabbitMQ instead, starting or installing it first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${BROKER:-embedded}" = rabbitmq ]; then
  bash scripts/ensure-rabbitmq.sh >&2
fi
exec cargo run --quiet -p dmr-cli -- dev "$@"
