#!/bin/sh
# Writes /etc/rabbitmq/rabbitmq.conf (and advanced.config) from the environment, then runs
# the server. RABBITMQ_NODE_PORT, RABBITMQ_NODE_IP_ADDRESS, RABBITMQ_DIST_PORT,
# RABBITMQ_NODENAME, ERL_EPMD_PORT and ERL_EPMD_ADDRESS are RabbitMQ's and Erlang's own;
# RABBITMQ_MANAGEMENT_PORT / RABBITMQ_MANAGEMENT_IP place the management listener and
# RABBITMQ_DIST_IP binds the Erlang distribution listener (this image's additions).
set -eu
conf=/etc/rabbitmq/rabbitmq.conf
: >"$conf"
if [ -n "${RABBITMQ_MANAGEMENT_PORT:-}" ]; then
  echo "management.tcp.port = $RABBITMQ_MANAGEMENT_PORT" >>"$conf"
fi
if [ -n "${RABBITMQ_MANAGEMENT_IP:-}" ]; then
  echo "management.tcp.ip = $RABBITMQ_MANAGEMENT_IP" >>"$conf"
fi
if [ -n "${RABBITMQ_DIST_IP:-}" ]; then
  ip=$(echo "$RABBITMQ_DIST_IP" | tr . ,)
  echo "[{kernel, [{inet_dist_use_interface, {$ip}}]}]." >/etc/rabbitmq/advanced.config
fi
exec "$@"
