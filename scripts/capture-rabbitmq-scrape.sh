#!/usr/bin/env bash
# Captures what RabbitMQ's built-in Prometheus plugin (rabbitmq_prometheus, the exporter the
# RabbitMQ Cluster Operator deployment in k8s/ and compose.yaml get) really exports, into
# monitoring/tests/fixtures/, so the alert rules and the dashboard are checked against real names
# rather than names copied from elsewhere. Run by hand when RabbitMQ's version changes; not part of
# the suite (the fixtures are committed).
#
# It starts a PRIVATE node (own node name, ports and data folder, like tests/support/node.rs), never
# the shared broker, declares an agent queue and its .dlq as the server does (quorum, durable),
# leaves a message in each and scrapes:
#   /metrics                                          aggregated (the default endpoint, scraped by
#                                                     monitoring/prometheus.yml and the ServiceMonitor)
#   /metrics/detailed?family=queue_coarse_metrics     per-queue depth (for the DLQ panel)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=monitoring/tests/fixtures

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
id="$(python3 -c 'import uuid; print(uuid.uuid4().hex[:12])')"
node="dmrscrape${id}@localhost"
amqp="$(free_port)"; dist="$(free_port)"; mgmt="$(free_port)"; prom="$(free_port)"
dir="$(mktemp -d /tmp/dmr-rabbit-scrape-XXXXXX)"
cat > "$dir/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:$amqp
management.tcp.port = $mgmt
management.tcp.ip = 127.0.0.1
prometheus.tcp.port = $prom
prometheus.tcp.ip = 127.0.0.1
CONF
echo "[rabbitmq_management,rabbitmq_prometheus]." > "$dir/enabled_plugins"
chown -R rabbitmq:rabbitmq "$dir"
cleanup() { rabbitmqctl -n "$node" stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT

RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$amqp" RABBITMQ_DIST_PORT="$dist" \
RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" \
  rabbitmq-server -detached
deadline=$((SECONDS + 120))
until rabbitmqctl -n "$node" await_startup --timeout 10 >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { echo "private node $node did not boot" >&2; exit 1; }
  sleep 1
done
until curl -fsS "http://127.0.0.1:$prom/metrics" >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { echo "no prometheus endpoint on $prom" >&2; exit 1; }
  sleep 1
done

admin=(rabbitmqadmin -H 127.0.0.1 -P "$mgmt" -u guest -p guest)
agent=d3b07384-d9a0-4c3f-a4e2-123456789abc
"${admin[@]}" declare queue name="$agent.dlq" durable=true arguments='{"x-queue-type":"quorum"}' >/dev/null
"${admin[@]}" declare queue name="$agent" durable=true \
  arguments="{\"x-queue-type\":\"quorum\",\"x-dead-letter-exchange\":\"\",\"x-dead-letter-routing-key\":\"$agent.dlq\"}" >/dev/null
"${admin[@]}" publish routing_key="$agent" payload=queued >/dev/null
"${admin[@]}" publish routing_key="$agent.dlq" payload=dead >/dev/null
"${admin[@]}" publish routing_key="$agent.dlq" payload=dead >/dev/null
# Queue metrics are collected every collect_statistics_interval (5 s by default): poll until the
# published messages show up instead of sleeping a fixed time.
until curl -fsS "http://127.0.0.1:$prom/metrics/detailed?family=queue_coarse_metrics" \
      | grep -q "rabbitmq_detailed_queue_messages{.*queue=\"$agent.dlq\".*} 2"; do
  [ $SECONDS -lt $deadline ] || { echo "queue metrics never showed the messages" >&2; exit 1; }
  sleep 1
done
version="$(rabbitmqctl -n "$node" version 2>/dev/null | tail -n1)"
for path in "metrics" "metrics/detailed?family=queue_coarse_metrics"; do
  name="rabbitmq-${version}-$(echo "$path" | tr '/?=' '---').prom"
  { echo "# Captured by scripts/capture-rabbitmq-scrape.sh from a private RabbitMQ $version node: GET /$path"
    curl -fsS "http://127.0.0.1:$prom/$path"; } > "$OUT/$name"
  echo "wrote $OUT/$name ($(grep -vc '^#' "$OUT/$name") samples)"
done
