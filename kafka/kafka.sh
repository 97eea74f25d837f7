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
#   RUNBUS_KAFKA_SECURE=1         a secured broker (below); ports default to 9096/9097 and the
#                                 state dir to <repo>/kafka/.state-secure
#
# The secured broker (RUNBUS_KAFKA_SECURE=1) speaks SASL_SSL only: TLS with a certificate for
# 127.0.0.1/localhost signed by a CA made locally with openssl, SCRAM-SHA-256 and -512 users
# created when the storage is formatted (PLAIN takes the same users and passwords, from the
# broker's configuration), and Kafka's StandardAuthorizer (nothing is allowed without an ACL).
# In <state>/secure (owner-only): ca.crt (what clients trust), <user>.password, and <user>.env
# with the RUNBUS_* settings of that user. Users and their ACLs:
#   admin   super user (the broker itself, the controller listener, the ACL set-up)
#   writer  topics runbus*: Write, Describe, Create                      (may write, not read)
#   reader  topics runbus*: Read, Describe; consumer groups runbus*: Read, Describe
#   runner  both (a job's process writes its events and reads its run back)
# Certificates and passwords are made once per state dir and kept across 'up' and 'down'.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd -P)"

KAFKA_VERSION="${RUNBUS_KAFKA_VERSION:-4.1.2}"
SECURE="${RUNBUS_KAFKA_SECURE:-0}"
if [[ "$SECURE" == 1 ]]; then
    PORT="${RUNBUS_KAFKA_PORT:-9096}"
    CONTROLLER_PORT="${RUNBUS_KAFKA_CONTROLLER_PORT:-9097}"
    DEFAULT_STATE="$SCRIPT_DIR/.state-secure"
else
    PORT="${RUNBUS_KAFKA_PORT:-9092}"
    CONTROLLER_PORT="${RUNBUS_KAFKA_CONTROLLER_PORT:-9093}"
    DEFAULT_STATE="$SCRIPT_DIR/.state"
fi
START_TIMEOUT="${RUNBUS_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${RUNBUS_KAFKA_STOP_TIMEOUT:-20}"
AUTO_CREATE="${RUNBUS_KAFKA_AUTO_CREATE_TOPICS:-false}"
HEAP_OPTS="${RUNBUS_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"

abspath() { mkdir -p -- "$1" && (cd -- "$1" && pwd -P); }

CACHE_ROOT="$(abspath "${RUNBUS_KAFKA_CACHE:-$SCRIPT_DIR/.cache}")"
STATE="$(abspath "${RUNBUS_KAFKA_STATE:-$DEFAULT_STATE}")"
LIBS="$CACHE_ROOT/kafka-$KAFKA_VERSION/libs"
MARKER="$CACHE_ROOT/kafka-$KAFKA_VERSION/.complete"
PROPS="$STATE/server.properties"
LOG4J="$STATE/log4j2.properties"
LOGFILE="$STATE/kafka.log"
OUTFILE="$STATE/kafka.out"
PIDFILE="$STATE/kafka.pid"
DATA="$STATE/data"
SEC="$STATE/secure"
ADMIN_CONFIG="$SEC/admin.properties"
SCRAM_USERS=(admin writer reader runner)

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
    local secured=()
    [[ "$SECURE" == 1 ]] && secured=(--command-config "$ADMIN_CONFIG")
    out="$(timeout 30 "$JAVA" "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$LOG4J" \
        -cp "$LIBS/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
        --bootstrap-server "127.0.0.1:$PORT" "${secured[@]}" 2>/dev/null)" || return 1
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

listener_config() {
    if [[ "$SECURE" != 1 ]]; then
        cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
EOF
        return 0
    fi
    local admin user plain_users=""
    admin="$(cat "$SEC/admin.password")"
    for user in "${SCRAM_USERS[@]}"; do plain_users+=" user_$user=\"$(cat "$SEC/$user.password")\""; done
    cat <<EOF
# SASL_SSL on both listeners. Clients use SCRAM or PLAIN (the same users and passwords), the broker
# itself SCRAM; the controller listener uses PLAIN as admin, since SCRAM users live in the metadata
# the controller serves.
listeners=SASL_SSL://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
inter.broker.listener.name=SASL_SSL
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:SASL_SSL,SASL_SSL:SASL_SSL
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
sasl.mechanism.controller.protocol=PLAIN
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$admin" user_admin="$admin";
ssl.keystore.type=PEM
ssl.keystore.location=$SEC/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$SEC/ca.crt
# Nothing is allowed without an ACL, except to the super user.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin
EOF
}

write_config() {
    # owner-only: the secured broker's configuration holds the admin password
    (umask 077; cat >"$PROPS") <<EOF
# Generated by kafka/kafka.sh - rewritten on every 'up'.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
$(listener_config)
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
    chmod 600 "$PROPS"
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

# ------------------------------------------------------- secured broker ---

# The CA, the broker's key and certificate, a password per user and the client settings, made
# once per state dir (owner-only) and kept.
ensure_secrets() {
    [[ "$SECURE" == 1 ]] || return 0
    command -v openssl >/dev/null 2>&1 || die "openssl not found; the secured broker makes its certificates with it"
    (umask 077; mkdir -p "$SEC")
    chmod 700 "$SEC"
    [[ -s "$SEC/ca.crt" && -s "$SEC/broker.pem" ]] || make_certificates
    local user
    for user in "${SCRAM_USERS[@]}"; do
        [[ -s "$SEC/$user.password" ]] || (umask 077; openssl rand -hex 24 >"$SEC/$user.password")
    done
    write_client_files
}

make_certificates() {
    say "making a CA and a certificate for 127.0.0.1/localhost in $SEC"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc)
    if ! (
        umask 077
        openssl req -x509 "${ec[@]}" -sha256 -days 3650 -subj "/CN=Runbus local Kafka CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout "$SEC/ca.key" -out "$SEC/ca.crt"
        openssl req -new "${ec[@]}" -subj "/CN=localhost" -keyout "$SEC/broker.key" -out "$SEC/broker.csr"
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" \
            "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" >"$SEC/broker.ext"
        openssl x509 -req -sha256 -days 3650 -in "$SEC/broker.csr" -CA "$SEC/ca.crt" -CAkey "$SEC/ca.key" \
            -set_serial "0x$(openssl rand -hex 8)" -extfile "$SEC/broker.ext" -out "$SEC/broker.crt"
        # a PEM key store: the (PKCS#8) key, then the certificate chain
        cat "$SEC/broker.key" "$SEC/broker.crt" "$SEC/ca.crt" >"$SEC/broker.pem"
    ) >"$SEC/openssl.log" 2>&1; then
        cat "$SEC/openssl.log" >&2
        die "openssl could not make the certificates (see above)"
    fi
    rm -f -- "$SEC/broker.csr" "$SEC/broker.ext"
}

# admin.properties for the Java tools; <user>.env with the RUNBUS_* settings of each user.
write_client_files() {
    local user
    (umask 077; cat >"$ADMIN_CONFIG") <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$SEC/admin.password")";
ssl.truststore.type=PEM
ssl.truststore.location=$SEC/ca.crt
EOF
    for user in "${SCRAM_USERS[@]}"; do
        (umask 077; cat >"$SEC/$user.env") <<EOF
# Runbus settings for user $user of the secured broker: set -a; . $SEC/$user.env; set +a
RUNBUS_BUS=kafka://127.0.0.1:$PORT
RUNBUS_KAFKA_SECURITY_PROTOCOL=SASL_SSL
RUNBUS_KAFKA_SASL_MECHANISM=SCRAM-SHA-512
RUNBUS_KAFKA_USER=$user
RUNBUS_KAFKA_PASSWORD_FILE=$SEC/$user.password
RUNBUS_KAFKA_CA_FILE=$SEC/ca.crt
EOF
    done
}

# Format fresh storage; the secured broker's SCRAM users are added to the metadata log here.
# The arguments go through an owner-only argument file, so no password shows in `ps`.
format_storage() {
    local cluster_id="$1" args="$STATE/format.args" user mechanism rc=0
    (
        umask 077
        {
            printf '"%s"\n' "${TOOL_JVM_OPTS[@]}" "-Dlog4j2.configurationFile=$LOG4J" \
                -cp "$(printf '%s:' "$LIBS"/*.jar)" kafka.tools.StorageTool format --standalone \
                -t "$cluster_id" -c "$PROPS"
            if [[ "$SECURE" == 1 ]]; then
                for user in "${SCRAM_USERS[@]}"; do
                    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
                        printf '"%s"\n' --add-scram "$mechanism=[name=$user,password=$(cat "$SEC/$user.password")]"
                    done
                done
            fi
        } >"$args"
    )
    "$JAVA" @"$args" >"$STATE/format.log" 2>&1 || rc=$?
    rm -f -- "$args"
    if (( rc != 0 )); then
        cat "$STATE/format.log" >&2
        die "storage format failed"
    fi
}

# The users' ACLs (kept in the metadata log: added once, on fresh storage).
add_acls() {
    [[ "$SECURE" == 1 ]] || return 0
    acl --allow-principal User:writer --allow-principal User:runner \
        --operation Write --operation Describe --operation Create --topic runbus
    acl --allow-principal User:reader --allow-principal User:runner \
        --operation Read --operation Describe --topic runbus --group runbus
}

acl() {
    if ! timeout 120 "$JAVA" "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$LOG4J" -cp "$LIBS/*" \
            org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$PORT" \
            --command-config "$ADMIN_CONFIG" --add --resource-pattern-type prefixed "$@" \
            >>"$STATE/acl.log" 2>&1; then
        cat "$STATE/acl.log" >&2
        die "could not add the ACLs ($*)"
    fi
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
    # a broker still starting (an 'up' in the background) is stopped once it has started
    exec 9>"$STATE/.lock"
    flock -w "$((START_TIMEOUT + 30))" 9 || say "another kafka.sh still holds $STATE/.lock; stopping what runs"
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
    # the holder may be fetching the jars (up to 600 s) before its own start
    flock -w "$((START_TIMEOUT + 630))" 9 || die "timed out waiting for another kafka.sh on $STATE"

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

    ensure_secrets
    local fresh=0
    if [[ "${RUNBUS_KAFKA_KEEP_DATA:-0}" == 1 && -f "$DATA/meta.properties" ]]; then
        # A restart (e.g. a broker-outage test): same storage, same topics and offsets.
        rm -f -- "$PIDFILE"
        write_config
    else
        # Fresh storage on every 'up': tests always start from an empty cluster.
        rm -rf -- "$DATA" "$PIDFILE" "$LOGFILE" "$OUTFILE" "$STATE/acl.log"
        write_config
        format_storage "$(random_uuid)"
        fresh=1
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
    if (( fresh )); then add_acls; fi
    say "ready on 127.0.0.1:$PORT (pid $pid, $((SECONDS - t0))s)"
    if [[ "$SECURE" == 1 ]]; then
        say "SASL_SSL; the settings of each user: $SEC/{runner,writer,reader,admin}.env (set -a; . FILE; set +a)"
    fi
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
    sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
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
