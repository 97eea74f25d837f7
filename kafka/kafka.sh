#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, combined broker+controller) for runbus
# development and tests. Jars come from Maven Central via kafka/pom.xml; no
# Docker, no Apache download site. Listens on 127.0.0.1 only.
#
#   kafka/kafka.sh up        fetch jars (first time), format fresh storage, start, wait until ready
#   kafka/kafka.sh down      stop the broker (and stale brokers of this state dir)
#   kafka/kafka.sh status    running? (exit 0) / not running (exit 1)
#   kafka/kafka.sh logs [-f] tail the broker log
#
# Environment (all optional):
#   RUNBUS_KAFKA_PORT             client listener port            (default 9092)
#   RUNBUS_KAFKA_CONTROLLER_PORT  KRaft controller port           (default 9093)
#   RUNBUS_KAFKA_STATE            state dir (config, data, logs)  (default <repo>/kafka/.state)
#   RUNBUS_KAFKA_CACHE            jar cache dir                   (default <repo>/kafka/.cache)
#   RUNBUS_KAFKA_VERSION          Kafka version from Maven        (default 4.1.2)
#   RUNBUS_KAFKA_START_TIMEOUT    seconds to wait for readiness   (default 90)
#   RUNBUS_KAFKA_STOP_TIMEOUT     seconds before SIGKILL on down  (default 20)
#   RUNBUS_KAFKA_AUTO_CREATE_TOPICS  auto.create.topics.enable    (default false)
#   RUNBUS_KAFKA_KEEP_DATA=1      'up' keeps the existing storage (restart) instead of a fresh one
#   RUNBUS_KAFKA_HEAP_OPTS        broker heap                     (default "-Xms256m -Xmx512m")
#   JAVA_HOME / RUNBUS_KAFKA_JAVA java binary (needs Java 17+)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd -P)"

KAFKA_VERSION="${RUNBUS_KAFKA_VERSION:-4.1.2}"
PORT="${RUNBUS_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${RUNBUS_KAFKA_CONTROLLER_PORT:-9093}"
START_TIMEOUT="${RUNBUS_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${RUNBUS_KAFKA_STOP_TIMEOUT:-20}"
AUTO_CREATE="${RUNBUS_KAFKA_AUTO_CREATE_TOPICS:-false}"
HEAP_OPTS="${RUNBUS_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"

abspath() { mkdir -p -- "$1" && (cd -- "$1" && pwd -P); }

CACHE_ROOT="$(abspath "${RUNBUS_KAFKA_CACHE:-$SCRIPT_DIR/.cache}")"
STATE="$(abspath "${RUNBUS_KAFKA_STATE:-$SCRIPT_DIR/.state}")"
LIBS="$CACHE_ROOT/kafka-$KAFKA_VERSION/libs"
MARKER="$CACHE_ROOT/kafka-$KAFKA_VERSION/.complete"
PROPS="$STATE/server.properties"
LOG4J="$STATE/log4j2.properties"
LOGFILE="$STATE/kafka.log"
OUTFILE="$STATE/kafka.out"
PIDFILE="$STATE/kafka.pid"
DATA="$STATE/data"

if [[ -n "${RUNBUS_KAFKA_JAVA:-}" ]]; then JAVA="$RUNBUS_KAFKA_JAVA"
elif [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then JAVA="$JAVA_HOME/bin/java"
else JAVA="java"; fi
# Short-lived CLI JVMs (readiness probe): favour startup time.
TOOL_JVM_OPTS=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xshare:auto -Xmx256m)

say() { echo "kafka: $*"; }
die() { echo "kafka: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- helpers ---

check_java() {
    command -v "$JAVA" >/dev/null 2>&1 || die "java not found (install Java 17+ or set JAVA_HOME)"
    local v
    v="$("$JAVA" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2; exit}')"
    [[ "${v%%.*}" =~ ^[0-9]+$ ]] || die "cannot determine Java version of $JAVA"
    (( ${v%%.*} >= 17 )) || die "Kafka $KAFKA_VERSION broker needs Java 17+, found $v ($JAVA)"
}

pom_hash() { sha256sum "$SCRIPT_DIR/pom.xml" | cut -d' ' -f1; }

# Download the broker + tools jars into $LIBS unless the marker for this
# version (and this pom) exists. Atomic: fetch into a temp dir, then rename.
ensure_jars() {
    local want; want="$(pom_hash)"
    if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$want" && -d "$LIBS" ]]; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || die "mvn not found; needed once to fetch Kafka $KAFKA_VERSION jars"
    mkdir -p "$CACHE_ROOT"
    exec 8>"$CACHE_ROOT/.lock"
    flock -w 600 8 || die "timed out waiting for another jar download ($CACHE_ROOT/.lock)"
    # Another process may have finished the download while we waited.
    if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$want" && -d "$LIBS" ]]; then
        exec 8>&-; return 0
    fi
    say "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS (one-time)"
    local tmp="$CACHE_ROOT/kafka-$KAFKA_VERSION/libs.tmp.$$" attempt ok=0
    for attempt in 1 2 3; do
        rm -rf -- "$tmp"
        if mvn -q -B -ntp -Dstyle.color=never -f "$SCRIPT_DIR/pom.xml" \
                -Dkafka.version="$KAFKA_VERSION" \
                -Dmaven.wagon.http.retryHandler.count=3 \
                dependency:copy-dependencies \
                -DincludeScope=runtime -DoutputDirectory="$tmp" >"$CACHE_ROOT/mvn.log" 2>&1; then
            ok=1; break
        fi
        say "maven attempt $attempt failed; see $CACHE_ROOT/mvn.log"
        sleep $((attempt * 3))
    done
    if (( ! ok )); then
        tail -n 30 "$CACHE_ROOT/mvn.log" >&2 || true
        rm -rf -- "$tmp"
        die "could not fetch Kafka $KAFKA_VERSION jars"
    fi
    [[ -n "$(ls "$tmp"/kafka_2.13-*.jar 2>/dev/null)" ]] || die "maven finished but kafka_2.13 jar is missing in $tmp"
    rm -rf -- "$LIBS" && mv -- "$tmp" "$LIBS"
    echo "$want" >"$MARKER"
    exec 8>&-
}

# PIDs of java processes running kafka.Kafka with *this* state dir's config.
# Matching is done with awk index() on ENVIRON values so the patterns never
# appear in any command line (no self-matches).
broker_pids() {
    KB_PROPS="$PROPS" ps -eo pid=,args= | KB_PROPS="$PROPS" awk '
        { pid = $1; cmd = $2; sub(/^.*\//, "", cmd) }
        function ends_with(s, t) { return length(s) >= length(t) && substr(s, length(s) - length(t) + 1) == t }
        cmd == "java" && ends_with($0, " kafka.Kafka " ENVIRON["KB_PROPS"]) { print pid }'
}

# PID from the pid file if that process is alive and still our broker.
pidfile_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid; pid="$(tr -dc '0-9' <"$PIDFILE")"
    [[ -n "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    local args; args="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$args" == *" kafka.Kafka $PROPS " ]] || return 1
    echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Real readiness check: BrokerApiVersionsCommand bootstraps with a Metadata
# request and then sends ApiVersions to every broker listed; node 1 only shows
# up in the metadata once it is registered and unfenced.
broker_ready() {
    local out
    out="$(timeout 30 "$JAVA" "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$LOG4J" \
        -cp "$LIBS/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
        --bootstrap-server "127.0.0.1:$PORT" 2>/dev/null)" || return 1
    [[ "$out" == *"(id: 1 "* ]]
}

print_log_tail() {
    local f shown=0
    for f in "$LOGFILE" "$OUTFILE"; do
        if [[ -s "$f" ]]; then
            echo "----- tail of $f -----" >&2
            tail -n 60 "$f" >&2 || true
            shown=1
        fi
    done
    (( shown )) || say "(broker wrote no log output yet: $LOGFILE)" >&2
}

# Kafka UUID (base64url of 16 random bytes, no padding, not starting with '-'),
# same format as `kafka.tools.StorageTool random-uuid`, without a JVM start.
random_uuid() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" != -* ]] && { echo "$id"; return; }
    done
}

write_config() {
    cat >"$PROPS" <<EOF
# Generated by kafka/kafka.sh - rewritten on every 'up'.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA
num.partitions=1
auto.create.topics.enable=$AUTO_CREATE
# Single node: everything replicated once; small internal topics start fast.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Small machine (2 cores).
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
EOF
    cat >"$LOG4J" <<EOF
# Generated by kafka/kafka.sh. Everything to $LOGFILE, WARN except start/stop notices.
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $LOGFILE
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.raftserver.name = kafka.server.KafkaRaftServer
logger.raftserver.level = INFO
logger.kafka.name = kafka.Kafka
logger.kafka.level = INFO
EOF
}

# ------------------------------------------------------------- subcommands ---

stop_pids() { # stop_pids PID...: SIGTERM, wait, SIGKILL
    local pids=("$@") pid waited=0 alive
    kill -TERM "${pids[@]}" 2>/dev/null || true
    while :; do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        (( ${#alive[@]} == 0 )) && return 0
        if (( waited >= STOP_TIMEOUT * 5 )); then
            say "still running after ${STOP_TIMEOUT}s, sending SIGKILL to ${alive[*]}"
            kill -KILL "${alive[@]}" 2>/dev/null || true
            sleep 0.5
            return 0
        fi
        sleep 0.2; waited=$((waited + 1))
    done
}

do_down() {
    local pids=() pid own=""
    own="$(pidfile_pid || true)"
    [[ -n "$own" ]] && pids+=("$own")
    for pid in $(broker_pids); do
        [[ "$pid" == "$own" ]] && continue
        say "found stale broker pid $pid (state $STATE)"
        pids+=("$pid")
    done
    if (( ${#pids[@]} == 0 )); then
        say "not running"
        rm -f -- "$PIDFILE"
        return 0
    fi
    say "stopping broker pid ${pids[*]}"
    stop_pids "${pids[@]}"
    rm -f -- "$PIDFILE"
    say "stopped"
}

wait_ready() { # wait_ready PID
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
    while (( SECONDS < deadline )); do
        if ! kill -0 "$pid" 2>/dev/null; then
            print_log_tail
            die "broker process $pid exited during startup"
        fi
        # Cheap poll until the listener is bound, then ask for real metadata.
        if port_open "$PORT" && broker_ready; then
            return 0
        fi
        sleep 0.3
    done
    print_log_tail
    say "broker not ready after ${START_TIMEOUT}s (RUNBUS_KAFKA_START_TIMEOUT); stopping pid $pid" >&2
    stop_pids "$pid"
    rm -f -- "$PIDFILE"
    die "broker failed to become ready"
}

do_up() {
    check_java
    exec 9>"$STATE/.lock"
    flock -w "$((START_TIMEOUT + 30))" 9 || die "timed out waiting for another kafka.sh on $STATE"

    local pid
    if pid="$(pidfile_pid)"; then
        if port_open "$PORT" && broker_ready; then
            say "already running (pid $pid) on 127.0.0.1:$PORT"
            return 0
        fi
        say "broker pid $pid is running but not answering yet; waiting"
        ensure_jars
        wait_ready "$pid"
        say "ready on 127.0.0.1:$PORT (pid $pid)"
        return 0
    fi

    ensure_jars

    # Left-overs of killed runs using this state dir would hold the data dir.
    local stale; stale="$(broker_pids | tr '\n' ' ')"
    if [[ -n "${stale// /}" ]]; then
        say "stopping stale broker(s) of this state dir: $stale"
        # shellcheck disable=SC2086
        stop_pids $stale
    fi
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        port_open "$p" && die "port 127.0.0.1:$p is already in use by another process (set RUNBUS_KAFKA_PORT / RUNBUS_KAFKA_CONTROLLER_PORT)"
    done

    if [[ "${RUNBUS_KAFKA_KEEP_DATA:-0}" == 1 && -f "$DATA/meta.properties" ]]; then
        # A restart (e.g. a broker-outage test): same storage, same topics and offsets.
        rm -f -- "$PIDFILE"
        write_config
    else
        # Fresh storage on every 'up': tests always start from an empty cluster.
        rm -rf -- "$DATA" "$PIDFILE" "$LOGFILE" "$OUTFILE"
        write_config
        local cluster_id; cluster_id="$(random_uuid)"
        if ! "$JAVA" "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$LOG4J" -cp "$LIBS/*" \
                kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$PROPS" \
                >"$STATE/format.log" 2>&1; then
            cat "$STATE/format.log" >&2
            die "storage format failed"
        fi
    fi

    say "starting Kafka $KAFKA_VERSION on 127.0.0.1:$PORT (controller $CONTROLLER_PORT, state $STATE)"
    # setsid: own session, so the broker outlives the caller's process group
    # (a killed test run leaves it behind; 'down' finds it by command line).
    # All stdio redirected so callers capturing our output never block on it;
    # fd 9 (the state lock) closed so the broker does not hold it.
    # shellcheck disable=SC2086
    setsid "$JAVA" -server $HEAP_OPTS \
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$STATE" \
        -cp "$LIBS/*" kafka.Kafka "$PROPS" \
        </dev/null >"$OUTFILE" 2>&1 8>&- 9>&- &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local t0=$SECONDS
    wait_ready "$pid"
    say "ready on 127.0.0.1:$PORT (pid $pid, $((SECONDS - t0))s)"
}

do_status() {
    local pid stale
    if pid="$(pidfile_pid)"; then
        if port_open "$PORT"; then
            say "running (pid $pid) on 127.0.0.1:$PORT"
        else
            say "running (pid $pid) but port $PORT not open yet"
        fi
        return 0
    fi
    stale="$(broker_pids | tr '\n' ' ')"
    if [[ -n "${stale// /}" ]]; then
        say "not running (stale broker process(es) without pid file: $stale; 'kafka.sh down' stops them)"
    else
        say "not running"
    fi
    return 1
}

do_logs() {
    [[ -f "$LOGFILE" ]] || die "no log yet at $LOGFILE"
    if [[ "${1:-}" == "-f" ]]; then
        exec tail -n 200 -F "$LOGFILE"
    fi
    tail -n 200 "$LOGFILE"
}

usage() {
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    up) do_up ;;
    down) do_down ;;
    status) do_status ;;
    logs) do_logs "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
