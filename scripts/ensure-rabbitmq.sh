#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers at RABBITMQ_DEFAULT_HOST:RABBITMQ_DEFAULT_PORT
# (default 127.0.0.1:5672). For a local address it starts the Debian broker if it is stopped and
# installs Debian's rabbitmq-server if it is missing. Fails loudly when no broker can be had.
set -euo pipefail

host="${RABBITMQ_DEFAULT_HOST:-127.0.0.1}"
port="${RABBITMQ_DEFAULT_PORT:-5672}"

answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

# An open port is not a working broker: a wedged node (seen after a heavy benchmark left a thousand
# queues behind) accepts TCP but never starts AMQP. Send the AMQP 0-9-1 protocol header and expect
# the first byte of a frame (type 1, Connection.Start) within a few seconds.
speaks_amqp() {
  timeout 10 bash -c 'exec 3<>"/dev/tcp/$0/$1" && printf "AMQP\x00\x00\x09\x01" >&3 && head -c 1 <&3 | od -An -tx1' \
    "$host" "$port" 2>/dev/null | grep -q 01
}

wait_for_broker() {
  for _ in $(seq 1 90); do
    if speaks_amqp; then
      # The port opens before the broker accepts logins; wait for the app to be fully booted.
      if command -v rabbitmqctl >/dev/null 2>&1; then
        timeout 60 rabbitmqctl -q await_startup >/dev/null 2>&1 || true
      fi
      return 0
    fi
    sleep 1
  done
  return 1
}

fail() {
  echo "ERROR: no RabbitMQ broker at $host:$port: $*" >&2
  echo "The DMR relay and its tests need a real RabbitMQ. Start one (rabbitmq-server -detached)," >&2
  echo "install Debian's package (apt-get install rabbitmq-server), or set RABBITMQ_DEFAULT_HOST/PORT." >&2
  exit 1
}

if speaks_amqp; then
  echo "RabbitMQ answers at $host:$port"
  exit 0
fi

case "$host" in
  127.*|localhost|::1) ;;
  *) fail "it does not answer AMQP, and it is not local, so it cannot be started from here" ;;
esac

if answers; then
  # The port is open but the broker does not speak AMQP: restart the local node.
  echo "RabbitMQ at $host:$port accepts connections but does not answer AMQP; restarting it" >&2
  timeout 60 rabbitmqctl stop >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do answers || break; sleep 1; done
  if answers; then
    echo "the node did not stop; killing it" >&2
    pkill -KILL -u rabbitmq -f beam.smp 2>/dev/null || pkill -KILL -f 'beam.smp.*rabbit' 2>/dev/null || true
    sleep 2
  fi
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not installed; installing Debian's rabbitmq-server" >&2
  if [ "$(id -u)" = 0 ]; then sudo_cmd=""; else sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq rabbitmq-server >/dev/null || fail "apt-get install rabbitmq-server failed"
fi

if ! answers; then
  echo "RabbitMQ is not running; starting it (rabbitmq-server -detached)" >&2
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
wait_for_broker || fail "it was started but did not answer within 90 s"
echo "RabbitMQ answers at $host:$port"
