#!/usr/bin/env bash
# Bring a single-node Apache Kafka (KRaft) for development and tests, with no Docker.
#
#   scripts/kafka.sh up      resolve the broker if needed, format storage once, start, wait until it answers
#   scripts/kafka.sh down    stop the broker started by `up` (by its pid file)
#   scripts/kafka.sh reset   stop, then wipe the broker's data and the workers' state dirs
#   scripts/kafka.sh status  say whether it runs
#
# Where the broker comes from, first match wins: $KAFKA_HOME (an unpacked release), the jars resolved
# from Maven Central with mvn into .cache/kafka, the official release archive.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAFKA_VERSION="${KAFKA_VERSION:-4.0.1}"
SCALA_VERSION="2.13"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
# Set to a port to let benchmarks read the broker's request counts over JMX (127.0.0.1 only).
KAFKA_JMX_PORT="${KAFKA_JMX_PORT:-}"
CACHE="${CP_CACHE_DIR:-$ROOT/.cache}/kafka/$KAFKA_VERSION"
STATE="${CP_VAR_DIR:-$ROOT/var}"
RUN="$STATE/kafka-$KAFKA_PORT"
PIDFILE="$RUN/broker.pid"
LOGFILE="$RUN/broker.log"
DATA="$RUN/data"
CLUSTER_ID="cp-local-cluster-0000A"   # 22 chars, base64-ish: one fixed id per dev broker

log() { printf 'kafka: %s\n' "$*" >&2; }

running() {
  [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null
}

classpath() {
  if [[ -n "${KAFKA_HOME:-}" ]]; then
    [[ -d "$KAFKA_HOME/libs" ]] || { log "KAFKA_HOME=$KAFKA_HOME has no libs/ folder"; exit 1; }
    echo "$KAFKA_HOME/libs/*"
    return
  fi
  if [[ ! -f "$CACHE/libs/.complete" ]]; then
    resolve_with_maven || resolve_from_archive
  fi
  echo "$CACHE/libs/*"
}

resolve_with_maven() {
  command -v mvn >/dev/null || { log "mvn not found"; return 1; }
  log "resolving kafka_$SCALA_VERSION:$KAFKA_VERSION and its runtime classpath with mvn (first run only)"
  mkdir -p "$CACHE"
  sed "s/@KAFKA_VERSION@/$KAFKA_VERSION/; s/@SCALA_VERSION@/$SCALA_VERSION/" \
    "$ROOT/scripts/kafka-broker.pom.xml" > "$CACHE/pom.xml"
  rm -rf "$CACHE/libs"
  if mvn -q -B -f "$CACHE/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$CACHE/libs" -DincludeScope=runtime >"$CACHE/mvn.log" 2>&1; then
    touch "$CACHE/libs/.complete"
    return 0
  fi
  log "mvn could not resolve the broker (see $CACHE/mvn.log)"
  return 1
}

resolve_from_archive() {
  local name="kafka_$SCALA_VERSION-$KAFKA_VERSION"
  local url="https://archive.apache.org/dist/kafka/$KAFKA_VERSION/$name.tgz"
  log "downloading the release archive $url"
  mkdir -p "$CACHE"
  curl -fsSL "$url" -o "$CACHE/$name.tgz"
  tar -xzf "$CACHE/$name.tgz" -C "$CACHE"
  rm -rf "$CACHE/libs" && mv "$CACHE/$name/libs" "$CACHE/libs"
  touch "$CACHE/libs/.complete"
}

write_config() {
  mkdir -p "$RUN" "$DATA"
  cat >"$RUN/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA
num.partitions=8
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.num.partitions=8
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
message.max.bytes=2097152
log.segment.bytes=67108864
PROPS
}

up() {
  if running; then
    log "already up on 127.0.0.1:$KAFKA_PORT (pid $(cat "$PIDFILE"))"
    return 0
  fi
  if port_open; then
    log "something already listens on 127.0.0.1:$KAFKA_PORT; using it as the broker"
    return 0
  fi
  command -v java >/dev/null || { log "java not found: install Java 17+"; exit 1; }
  local cp
  cp="$(classpath)"
  write_config
  if [[ ! -f "$DATA/meta.properties" ]]; then
    log "formatting storage in $DATA"
    java -cp "$cp" -Dlog4j2.configurationFile="$ROOT/scripts/kafka-log4j2.yaml" \
      kafka.tools.StorageTool format -t "$CLUSTER_ID" -c "$RUN/server.properties" \
      >>"$LOGFILE" 2>&1
  fi
  local jmx=""
  if [[ -n "$KAFKA_JMX_PORT" ]]; then
    jmx="-Dcom.sun.management.jmxremote.port=$KAFKA_JMX_PORT"
    jmx+=" -Dcom.sun.management.jmxremote.rmi.port=$KAFKA_JMX_PORT"
    jmx+=" -Dcom.sun.management.jmxremote.host=127.0.0.1 -Djava.rmi.server.hostname=127.0.0.1"
    jmx+=" -Dcom.sun.management.jmxremote.authenticate=false -Dcom.sun.management.jmxremote.ssl=false"
    log "JMX on 127.0.0.1:$KAFKA_JMX_PORT"
  fi
  log "starting on 127.0.0.1:$KAFKA_PORT (log: $LOGFILE)"
  # shellcheck disable=SC2086
  nohup java $KAFKA_HEAP_OPTS $jmx -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/scripts/kafka-log4j2.yaml" \
    -cp "$cp" kafka.Kafka "$RUN/server.properties" >>"$LOGFILE" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    if ! running; then
      log "broker exited during start; last lines of $LOGFILE:"
      tail -n 20 "$LOGFILE" >&2
      exit 1
    fi
    if port_open && grep -q "Kafka Server started" "$LOGFILE"; then
      log "up (pid $(cat "$PIDFILE"))"
      return 0
    fi
    sleep 0.5
  done
  log "broker did not answer within 60 s; see $LOGFILE"
  exit 1
}

down() {
  if ! running; then
    log "not running"
    rm -f "$PIDFILE"
    return 0
  fi
  local pid
  pid="$(cat "$PIDFILE")"
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; log "stopped"; return 0; }
    sleep 0.5
  done
  log "broker did not stop in 30 s; killing pid $pid"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

reset() {
  down
  rm -rf "$DATA" "$STATE/workers"
  log "wiped broker data and worker state"
}

status() {
  if running; then echo "up (pid $(cat "$PIDFILE"), 127.0.0.1:$KAFKA_PORT)"; else echo "down"; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  reset) reset ;;
  status) status ;;
  *) echo "usage: $0 up|down|reset|status" >&2; exit 2 ;;
esac
