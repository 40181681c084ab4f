#!/usr/bin/env bash
# Install and run the local services oncely's tests need, on loopback only.
#
#   scripts/services.sh up       install what is missing, start what is stopped, wait until ready
#   scripts/services.sh status   one line per service; exit 1 if any is not running
#   scripts/services.sh down     stop them
#
# Services (Debian 12 packages, no service manager needed, run as root):
#   RabbitMQ    amqp://guest:guest@127.0.0.1:5672/          (rabbitmq-server, 3.10.x)
#   PostgreSQL  postgresql://oncely:oncely@127.0.0.1:5432/oncely  (own cluster in $STATE_DIR)
#   Redis       redis://127.0.0.1:6379/0                    (redis-server)
#   Redis Cluster redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002/0?cluster=1
#               (three redis-server nodes, no replicas, data in $STATE_DIR/redis-cluster)
#   ElasticMQ   http://127.0.0.1:9324 (SQS API)               (Maven Central, Java 17; jars cached in $STATE_DIR)
#   Kafka       kafka://127.0.0.1:9092                      (Apache Kafka 4.1.1, KRaft, from
#               Maven Central into $STATE_DIR/kafka/lib; needs java 17 and mvn)
#
# `up` is idempotent: a service that already answers is left alone, so a second `up` only
# probes. Every wait is bounded (ONCELY_TEST_SERVICES_TIMEOUT, default 90 s) and a service that does
# not come up is a failure (non-zero exit), never a skip. RabbitMQ's config files under
# /etc/rabbitmq are rewritten by `up`; a change takes effect after `down` and `up`.
set -euo pipefail

STATE_DIR=${ONCELY_TEST_SERVICES_DIR:-/var/lib/oncely}
TIMEOUT=${ONCELY_TEST_SERVICES_TIMEOUT:-90}
HOST=127.0.0.1
AMQP_PORT=5672
PG_PORT=5432
REDIS_PORT=6379
PG_USER=oncely PG_PASSWORD=oncely PG_DB=oncely
PG_DATA=$STATE_DIR/postgres
PG_SOCKET_DIR=/var/run/postgresql
PG_LOG=$PG_DATA/server.log
REDIS_DIR=$STATE_DIR/redis
RABBIT_ETC=/etc/rabbitmq
RABBIT_LOG_DIR=/var/log/rabbitmq
MARKER="# Managed by oncely scripts/services.sh; rewritten by 'up'."

log() { printf '%s\n' "services: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (it installs packages and runs services as their own users)"
}

# True if something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, no extra tools).
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_until() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "$what did not succeed within ${limit}s"
            return 1
        fi
        sleep 0.5
    done
}

pg_bindir() { # the newest installed PostgreSQL's bin directory, or nothing
    local d
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [[ -x $d/pg_ctl ]] && printf '%s\n' "$d"
}

# ---------------------------------------------------------------------------------- install
install_missing() {
    local pkgs=()
    command -v rabbitmq-server >/dev/null || pkgs+=(rabbitmq-server)
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
        pkgs+=(redis-server redis-tools)
    [[ -n $(pg_bindir) ]] || pkgs+=(postgresql)
    command -v runuser >/dev/null || pkgs+=(util-linux)
    ((${#pkgs[@]})) || return 0

    log "installing: ${pkgs[*]}"
    # Keep package postinst scripts from starting services (on all interfaces) on their own;
    # this script starts them, on loopback. Only add a policy file if there is none.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >&2 || rc=$?
    ((added_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${pkgs[*]} failed (exit $rc)"
}

# --------------------------------------------------------------------------------- RabbitMQ
# 3.10 has no per-queue x-consumer-timeout (that came in 3.12), so the delivery
# acknowledgement timeout is the global consumer_timeout. AMQP cannot extend a delivery, so it
# must exceed the longest handler timeout; when it fires the broker closes the channel and
# requeues every unacked delivery on it.
RABBIT_CONSUMER_TIMEOUT_MS=3600000 # 1 hour

write_if_changed() { # PATH CONTENT: returns 0 if the file changed
    local path=$1 content=$2
    if [[ -f $path ]] && [[ $(<"$path") == "$content" ]]; then
        return 1
    fi
    if [[ -f $path ]] && ! grep -qF "$MARKER" "$path" && [[ ! -e $path.orig ]]; then
        cp -p "$path" "$path.orig"
    fi
    printf '%s\n' "$content" >"$path"
    return 0
}

rabbit_configure() {
    install -d -m 755 "$RABBIT_ETC"
    local changed=0 env_conf conf
    # Sourced by the rabbitmq scripts (server and CLI). Binds AMQP, epmd and Erlang
    # distribution (server and CLI tools) to loopback.
    env_conf="$MARKER
NODE_IP_ADDRESS=$HOST
NODE_PORT=$AMQP_PORT
ERL_EPMD_ADDRESS=$HOST
SERVER_ADDITIONAL_ERL_ARGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"
CTL_ERL_ARGS=\"-kernel inet_dist_use_interface {127,0,0,1}\""
    conf="$MARKER
# Delivery acknowledgement timeout, global because 3.10 has no per-queue x-consumer-timeout
# (3.12+). It must exceed the longest handler timeout: 1 hour = 3600000 ms. Checked about once
# a minute; when it fires the channel is closed and its unacked deliveries are requeued.
consumer_timeout = $RABBIT_CONSUMER_TIMEOUT_MS
loopback_users.guest = true
log.console = false
log.file.level = info"
    write_if_changed "$RABBIT_ETC/rabbitmq-env.conf" "$env_conf" && changed=1
    write_if_changed "$RABBIT_ETC/rabbitmq.conf" "$conf" && changed=1
    # No plugins: the management UI would listen on 0.0.0.0:15672.
    write_if_changed "$RABBIT_ETC/enabled_plugins" "[]." && changed=1
    return $((1 - changed))
}

rabbit_ping() { timeout 20 rabbitmq-diagnostics -q ping; }
# Only root (or rabbitmq) may run the CLI; anyone else gets the port check alone.
rabbit_running() { port_open "$AMQP_PORT" && { [[ $(id -u) -ne 0 ]] || rabbit_ping >/dev/null 2>&1; }; }

rabbit_up() {
    local config_changed=0
    rabbit_configure && config_changed=1
    if port_open "$AMQP_PORT"; then
        ((config_changed)) &&
            log "rabbitmq: config in $RABBIT_ETC changed; run 'down' then 'up' to apply it"
        wait_until "$TIMEOUT" "rabbitmq-diagnostics ping" rabbit_ping ||
            die "rabbitmq: port $AMQP_PORT is open but the node does not answer ping"
        return 0
    fi
    log "rabbitmq: starting"
    install -d -o rabbitmq -g rabbitmq "$RABBIT_LOG_DIR" /var/lib/rabbitmq
    # epmd first, on loopback: otherwise the first Erlang node or CLI tool starts it on all
    # interfaces.
    ERL_EPMD_ADDRESS=$HOST runuser -u rabbitmq -- epmd -address "$HOST" -daemon
    rabbitmq-server -detached
    if ! wait_until "$TIMEOUT" "rabbitmq-diagnostics ping" rabbit_ping ||
        ! timeout "$TIMEOUT" rabbitmqctl -q await_startup --timeout "$TIMEOUT" >/dev/null ||
        ! wait_until "$TIMEOUT" "AMQP port $AMQP_PORT" port_open "$AMQP_PORT"; then
        tail -n 30 "$RABBIT_LOG_DIR"/rabbit@*.log 2>/dev/null >&2 || true
        die "rabbitmq did not come up within ${TIMEOUT}s (logs: $RABBIT_LOG_DIR)"
    fi
}

rabbit_down() {
    if ! port_open "$AMQP_PORT" && ! rabbit_ping >/dev/null 2>&1; then
        log "rabbitmq: not running"
    else
        log "rabbitmq: stopping"
        timeout "$TIMEOUT" rabbitmqctl -q shutdown >&2 || die "rabbitmq: shutdown failed"
    fi
    # epmd refuses to die while a node is registered, which is what we want.
    if pgrep -x epmd >/dev/null; then epmd -kill >/dev/null 2>&1 || true; fi
}

rabbit_status() {
    if rabbit_running; then
        local info version timeout_ms
        # The live values, not this script's: a node started elsewhere may differ.
        info=$(timeout 20 rabbitmqctl -q eval 'io:format("~s ~p~n", [rabbit_misc:version(),
            application:get_env(rabbit, consumer_timeout, undefined)]).' 2>/dev/null | head -n 1)
        read -r version timeout_ms <<<"${info:-? ?}"
        echo "rabbitmq    running   amqp://guest:guest@$HOST:$AMQP_PORT/  (RabbitMQ $version, consumer_timeout=${timeout_ms}ms)"
    else
        echo "rabbitmq    stopped"
        return 1
    fi
}

# ------------------------------------------------------------------------------- PostgreSQL
pg() { runuser -u postgres -- "$@"; }
pg_ready() { "$(pg_bindir)/pg_isready" -q -h "$HOST" -p "$PG_PORT"; }
pg_ours() { [[ -f $PG_DATA/PG_VERSION ]] && pg "$(pg_bindir)/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1; }

pg_ensure_db() {
    local psql
    psql=("$(pg_bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U postgres -d postgres)
    pg "${psql[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'" | grep -q 1 ||
        pg "${psql[@]}" -c "CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
    pg "${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1 ||
        pg "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
}

pg_up() {
    local bin
    bin=$(pg_bindir)
    install -d -o postgres -g postgres -m 2775 "$PG_SOCKET_DIR"
    if ! pg_ready; then
        install -d -o postgres -g postgres -m 700 "$PG_DATA"
        if [[ ! -f $PG_DATA/PG_VERSION ]]; then
            log "postgres: initdb $PG_DATA"
            pg "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
                --auth-local=peer --auth-host=scram-sha-256 >/dev/null
            # A throwaway test cluster: durability against an OS crash is not needed.
            cat >>"$PG_DATA/postgresql.conf" <<EOF

$MARKER
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
fsync = off
full_page_writes = off
max_connections = 200
EOF
        fi
        log "postgres: starting"
        pg "$bin/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" >/dev/null ||
            { tail -n 20 "$PG_LOG" >&2 || true; die "postgres did not start (log: $PG_LOG)"; }
        wait_until "$TIMEOUT" "pg_isready" pg_ready || die "postgres is not accepting connections on $HOST:$PG_PORT"
    fi
    pg_ensure_db || die "postgres: could not create role/database $PG_USER/$PG_DB (is the server on $PG_PORT ours?)"
}

pg_down() {
    if pg_ours; then
        log "postgres: stopping"
        pg "$(pg_bindir)/pg_ctl" stop -D "$PG_DATA" -m fast -w -t "$TIMEOUT" >/dev/null || die "postgres: stop failed"
    elif pg_ready; then
        log "postgres: a server on $HOST:$PG_PORT was not started by this script; left alone"
    else
        log "postgres: not running"
    fi
}

pg_status() {
    if [[ -n $(pg_bindir) ]] && pg_ready; then
        echo "postgres    running   postgresql://$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT/$PG_DB  (data: $PG_DATA)"
    else
        echo "postgres    stopped"
        return 1
    fi
}

# ------------------------------------------------------------------------------------ Redis
redis_ping() { [[ $(timeout 5 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

redis_up() {
    redis_ping && return 0
    log "redis: starting"
    install -d -o redis -g redis -m 750 "$REDIS_DIR"
    # No persistence: a test cache. Bound to loopback with protected mode on.
    runuser -u redis -- redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" \
        --protected-mode yes --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" \
        --logfile "$REDIS_DIR/redis.log" --save "" --appendonly no
    wait_until "$TIMEOUT" "redis-cli ping" redis_ping ||
        { tail -n 20 "$REDIS_DIR/redis.log" >&2 || true; die "redis did not come up within ${TIMEOUT}s"; }
}

redis_down() {
    if redis_ping; then
        log "redis: stopping"
        timeout "$TIMEOUT" redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        ! redis_ping || die "redis: still running after shutdown"
    else
        log "redis: not running"
    fi
}

redis_status() {
    if command -v redis-cli >/dev/null && redis_ping; then
        echo "redis       running   redis://$HOST:$REDIS_PORT/0"
    else
        echo "redis       stopped"
        return 1
    fi
}

# ---------------------------------------------------------------------------- Redis Cluster
# Three primaries, no replicas, no persistence: enough to test hash tags, slot routing and
# per-node pipelines. Each node keeps its cluster config (nodes.conf) in its own directory.
REDIS_CLUSTER_PORTS=(7000 7001 7002)
REDIS_CLUSTER_DIR=$STATE_DIR/redis-cluster

rc_cli() { timeout 5 redis-cli -h "$HOST" -p "$1" "${@:2}" 2>/dev/null; }
rc_ping() { [[ $(rc_cli "$1" ping) == PONG ]]; }
rc_info() { rc_cli "$1" cluster info | tr -d '\r'; }
rc_ok_on() { rc_info "$1" | grep -qx 'cluster_state:ok'; }
rc_unjoined() { rc_info "$1" | grep -qx 'cluster_slots_assigned:0'; }
rc_stopped() { ! rc_ping "$1"; }
rc_port_free() { ! port_open "$1"; }
rc_all() { local p; for p in "${REDIS_CLUSTER_PORTS[@]}"; do "$@" "$p" || return 1; done; }
rc_healthy() { rc_all rc_ok_on; }

rc_tail_logs() {
    local p
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        tail -n 10 "$REDIS_CLUSTER_DIR/$p/redis.log" >&2 2>/dev/null || true
    done
}

rc_start_fresh() {
    local p
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        rc_ping "$p" && { rc_cli "$p" shutdown nosave >/dev/null || true; }
    done
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        wait_until 10 "redis cluster node $p to stop" rc_port_free "$p" ||
            die "redis cluster: port $p is still in use (not ours?)"
        rm -rf "${REDIS_CLUSTER_DIR:?}/$p"
        install -d -o redis -g redis -m 750 "$REDIS_CLUSTER_DIR/$p"
        runuser -u redis -- redis-server --daemonize yes --bind "$HOST" --port "$p" \
            --protected-mode yes --dir "$REDIS_CLUSTER_DIR/$p" \
            --pidfile "$REDIS_CLUSTER_DIR/$p/redis.pid" --logfile "$REDIS_CLUSTER_DIR/$p/redis.log" \
            --save "" --appendonly no --cluster-enabled yes --cluster-config-file nodes.conf \
            --cluster-node-timeout 5000
    done
    wait_until "$TIMEOUT" "redis cluster nodes to answer ping" rc_all rc_ping ||
        { rc_tail_logs; die "redis cluster: nodes did not start within ${TIMEOUT}s"; }
}

rc_create() {
    log "redis cluster: joining ${REDIS_CLUSTER_PORTS[*]}"
    local nodes=() p
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do nodes+=("$HOST:$p"); done
    timeout "$TIMEOUT" redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
        >"$REDIS_CLUSTER_DIR/create.log" 2>&1 ||
        { tail -n 20 "$REDIS_CLUSTER_DIR/create.log" >&2 || true; rc_tail_logs; die "redis cluster: create failed"; }
}

redis_cluster_up() {
    rc_healthy && return 0
    install -d -m 755 "$REDIS_CLUSTER_DIR"
    if ! rc_all rc_ping; then
        log "redis cluster: starting nodes ${REDIS_CLUSTER_PORTS[*]}"
        rc_start_fresh
        rc_create
    elif rc_all rc_unjoined; then
        rc_create # running but never joined
    elif ! wait_until 15 "redis cluster state ok" rc_healthy; then
        log "redis cluster: state not ok; rebuilding it (its data is test data)"
        rc_start_fresh
        rc_create
    fi
    wait_until "$TIMEOUT" "redis cluster state ok on every node" rc_healthy ||
        { rc_tail_logs; die "redis cluster did not reach cluster_state:ok within ${TIMEOUT}s"; }
}

redis_cluster_down() {
    local p any=0
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        if rc_ping "$p"; then
            any=1
            rc_cli "$p" shutdown nosave >/dev/null || true
        fi
    done
    if ((any)); then
        log "redis cluster: stopped"
        wait_until 10 "redis cluster nodes to stop" rc_all rc_stopped ||
            die "redis cluster: a node is still running after shutdown"
    else
        log "redis cluster: not running"
    fi
}

redis_cluster_status() {
    local urls="" p
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do urls+="${urls:+,}$HOST:$p"; done
    if command -v redis-cli >/dev/null && rc_healthy; then
        echo "redis-cluster running redis://$urls/0?cluster=1"
    else
        echo "redis-cluster stopped"
        return 1
    fi
}

# -------------------------------------------------------------------------------- ElasticMQ
# An SQS-compatible server (in memory) for the sqs:// broker's tests. The jars are resolved
# once from Maven Central with scripts/elasticmq/pom.xml into $ELASTICMQ_DIR/lib; a later `up`
# reuses them. It runs as a plain background java process with a pid file and a log file.
ELASTICMQ_VERSION=1.7.1
ELASTICMQ_PORT=${ONCELY_TEST_ELASTICMQ_PORT:-9324}
ELASTICMQ_DIR=$STATE_DIR/elasticmq
ELASTICMQ_POM=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/elasticmq/pom.xml

elasticmq_url() { printf 'http://%s:%s' "$HOST" "$ELASTICMQ_PORT"; }
elasticmq_pid() { [[ -f $ELASTICMQ_DIR/elasticmq.pid ]] && cat "$ELASTICMQ_DIR/elasticmq.pid"; }
elasticmq_ours() { local pid; pid=$(elasticmq_pid) && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }
# A real SQS call over HTTP (the query protocol), not just an open port.
elasticmq_ping() {
    curl -sf --max-time 10 --retry 2 "$(elasticmq_url)/?Action=ListQueues&Version=2012-11-05&QueueNamePrefix=oncely-ping" |
        grep -q ListQueuesResponse
}

java_install_tools() { # Java 17 and Maven, from Debian, when missing (ElasticMQ and Kafka)
    local pkgs=()
    command -v java >/dev/null || pkgs+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null || pkgs+=(maven)
    ((${#pkgs[@]})) || return 0
    log "installing: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >&2 ||
        die "apt-get install ${pkgs[*]} failed"
}

elasticmq_resolve() {
    local lib=$ELASTICMQ_DIR/lib stamp=$ELASTICMQ_DIR/lib/.resolved-$ELASTICMQ_VERSION
    [[ -f $stamp ]] && return 0
    java_install_tools
    log "elasticmq: resolving org.elasticmq:elasticmq-server_2.13:$ELASTICMQ_VERSION from Maven Central"
    rm -rf "$lib"
    install -d -m 755 "$lib"
    timeout "$((TIMEOUT * 4))" mvn -q -B -f "$ELASTICMQ_POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$lib" >&2 ||
        die "elasticmq: mvn dependency:copy-dependencies failed"
    compgen -G "$lib/elasticmq-server_2.13-*.jar" >/dev/null || die "elasticmq: no server jar in $lib"
    touch "$stamp"
}

elasticmq_configure() {
    # Loopback only; no stats UI (it would listen on 9325); INFO logs (the bundled config
    # logs DEBUG); strict SQS limits so tests meet the same limits as AWS.
    cat >"$ELASTICMQ_DIR/elasticmq.conf" <<EOF
$MARKER
include classpath("application.conf")
node-address { protocol = http, host = "$HOST", port = $ELASTICMQ_PORT, context-path = "" }
generate-node-address = false
rest-sqs { enabled = true, bind-hostname = "$HOST", bind-port = $ELASTICMQ_PORT, sqs-limits = strict }
rest-stats { enabled = false }
aws { region = "us-east-1", accountId = "000000000000" }
pekko.loglevel = "INFO"
EOF
}

# Wait (bounded) for the log's "started" line; give up at once if the process is gone.
elasticmq_wait_started() {
    local deadline=$((SECONDS + TIMEOUT))
    until grep -q 'ElasticMQ server .* started' "$1"; do
        elasticmq_ours || { log "elasticmq: the java process exited"; return 1; }
        ((SECONDS < deadline)) || { log "elasticmq: no 'started' line within ${TIMEOUT}s"; return 1; }
        sleep 0.5
    done
}

elasticmq_up() {
    if elasticmq_ping; then
        elasticmq_ours || log "elasticmq: a server on $HOST:$ELASTICMQ_PORT was not started by this script; left alone"
        return 0
    fi
    if port_open "$ELASTICMQ_PORT"; then
        wait_until "$TIMEOUT" "ElasticMQ ListQueues" elasticmq_ping ||
            die "elasticmq: port $ELASTICMQ_PORT is open but does not answer ListQueues"
        return 0
    fi
    elasticmq_resolve
    elasticmq_configure
    log "elasticmq: starting"
    local logf=$ELASTICMQ_DIR/elasticmq.log
    : >"$logf"
    setsid java -Xmx256m -Dconfig.file="$ELASTICMQ_DIR/elasticmq.conf" -cp "$ELASTICMQ_DIR/lib/*" \
        org.elasticmq.server.Main >>"$logf" 2>&1 </dev/null &
    echo $! >"$ELASTICMQ_DIR/elasticmq.pid"
    if ! elasticmq_wait_started "$logf" ||
        ! wait_until "$TIMEOUT" "ElasticMQ ListQueues" elasticmq_ping; then
        tail -n 30 "$logf" >&2 || true
        elasticmq_ours && kill "$(elasticmq_pid)" 2>/dev/null
        die "elasticmq did not come up (log: $logf)"
    fi
}

elasticmq_down() {
    if elasticmq_ours; then
        log "elasticmq: stopping"
        local pid
        pid=$(elasticmq_pid)
        kill "$pid"
        wait_until "$TIMEOUT" "elasticmq to exit" bash -c "! kill -0 $pid" ||
            die "elasticmq: pid $pid still running"
        rm -f "$ELASTICMQ_DIR/elasticmq.pid"
    elif elasticmq_ping; then
        log "elasticmq: a server on $HOST:$ELASTICMQ_PORT was not started by this script; left alone"
    else
        log "elasticmq: not running"
    fi
}

elasticmq_status() {
    if elasticmq_ping; then
        echo "elasticmq   running   $(elasticmq_url)  (SQS API, ElasticMQ $ELASTICMQ_VERSION, log: $ELASTICMQ_DIR/elasticmq.log)"
    else
        echo "elasticmq   stopped"
        return 1
    fi
}

# ------------------------------------------------------------------------------------ Kafka
# Apache Kafka in KRaft mode: one combined broker+controller, jars resolved by Maven from
# scripts/kafka/pom.xml into a cache outside git, data under $STATE_DIR/kafka/data.
KAFKA_DIR=$STATE_DIR/kafka
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
KAFKA_CLUSTER_ID=b25jZWx5LXRlc3RzLTAwMQ # fixed: `format --ignore-formatted` stays idempotent
KAFKA_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/kafka" && pwd)
KAFKA_LOG=$KAFKA_DIR/server.log
KAFKA_READY_TIMEOUT=${ONCELY_TEST_KAFKA_TIMEOUT:-120}

kafka_ping() { python3 "$KAFKA_SRC/probe.py" "$HOST" "$KAFKA_PORT"; }

# Resolve once per pom content: the marker holds the pom's hash (not its mtime, which every
# fresh checkout renews). A new set is resolved beside the old one and swapped in, so a
# running server or a test's private instance never finds the directory empty.
kafka_jars() {
    local marker=$KAFKA_DIR/lib/.complete want
    want=$(sha256sum "$KAFKA_SRC/pom.xml" | cut -d' ' -f1)
    if [[ -f $marker && ! -s $marker ]]; then echo "$want" >"$marker"; fi # an older, hashless marker
    [[ -f $marker && $(<"$marker") == "$want" ]] && return 0
    log "kafka: resolving jars with maven into $KAFKA_DIR/lib"
    rm -rf "$KAFKA_DIR/lib.new" "$KAFKA_DIR/lib.old"
    mvn -q -B -Dstyle.color=never -f "$KAFKA_SRC/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$KAFKA_DIR/lib.new" -DincludeScope=runtime >&2 ||
        die "kafka: mvn dependency:copy-dependencies failed"
    echo "$want" >"$KAFKA_DIR/lib.new/.complete"
    if [[ -d $KAFKA_DIR/lib ]]; then mv "$KAFKA_DIR/lib" "$KAFKA_DIR/lib.old"; fi
    mv "$KAFKA_DIR/lib.new" "$KAFKA_DIR/lib"
    rm -rf "$KAFKA_DIR/lib.old"
}

# kafka_wait PID: until a metadata answer (0), or the process exited or the bound passed (1).
kafka_wait() {
    local deadline=$((SECONDS + KAFKA_READY_TIMEOUT))
    until kafka_ping >/dev/null 2>&1; do
        if ! kill -0 "$1" 2>/dev/null; then
            log "kafka exited during start-up"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "kafka did not answer a metadata request within ${KAFKA_READY_TIMEOUT}s"
            return 1
        fi
        sleep 0.5
    done
}

# kafka_config PROPERTIES DATA PORT CONTROLLER_PORT: write a server.properties from the template.
kafka_config() {
    sed -e "s|@DATA@|$2|" -e "s|@PORT@|$3|g" -e "s|@CONTROLLER_PORT@|$4|g" \
        "$KAFKA_SRC/server.properties.in" >"$1"
}

kafka_up() {
    java_install_tools
    install -d -m 755 "$KAFKA_DIR" "$KAFKA_DIR/data"
    kafka_jars
    if kafka_ping >/dev/null 2>&1; then return 0; fi
    if port_open "$KAFKA_PORT"; then
        wait_until "$KAFKA_READY_TIMEOUT" "kafka metadata on $KAFKA_PORT" kafka_ping || {
            tail -n 30 "$KAFKA_LOG" >&2 || true
            die "kafka: port $KAFKA_PORT is open but no metadata answer (log: $KAFKA_LOG)"
        }
        return 0
    fi
    kafka_config "$KAFKA_DIR/server.properties" "$KAFKA_DIR/data" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
    java -cp "$KAFKA_DIR/lib/*" kafka.tools.StorageTool format \
        --config "$KAFKA_DIR/server.properties" --cluster-id "$KAFKA_CLUSTER_ID" \
        --ignore-formatted >>"$KAFKA_LOG" 2>&1 ||
        { tail -n 20 "$KAFKA_LOG" >&2; die "kafka: storage format failed"; }
    log "kafka: starting"
    nohup java -Xmx1536m -Xms256m -XX:+UseG1GC -Djava.awt.headless=true \
        -Dlog4j2.formatMsgNoLookups=true -cp "$KAFKA_DIR/lib/*" \
        kafka.Kafka "$KAFKA_DIR/server.properties" >>"$KAFKA_LOG" 2>&1 </dev/null &
    echo $! >"$KAFKA_DIR/kafka.pid"
    if ! kafka_wait $!; then
        tail -n 30 "$KAFKA_LOG" >&2 || true
        die "kafka did not start (log: $KAFKA_LOG)"
    fi
}

kafka_down() {
    local pid
    pid=$(cat "$KAFKA_DIR/kafka.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        log "kafka: stopping"
        kill "$pid"
        wait_until "$TIMEOUT" "kafka shutdown" bash -c "! kill -0 $pid" ||
            { kill -9 "$pid" 2>/dev/null || true; }
        rm -f "$KAFKA_DIR/kafka.pid"
    elif port_open "$KAFKA_PORT"; then
        log "kafka: a server on $HOST:$KAFKA_PORT was not started by this script; left alone"
    else
        log "kafka: not running"
    fi
}

kafka_status() {
    if kafka_ping >/dev/null 2>&1; then
        echo "kafka       running   kafka://$HOST:$KAFKA_PORT  (Apache Kafka 4.1.1 KRaft, data: $KAFKA_DIR/data)"
    else
        echo "kafka       stopped"
        return 1
    fi
}

# ------------------------------------------------------------------------ browser and promtool
# Headless Chromium for the status page's browser test, and promtool (Debian's prometheus
# package; its server is not started) to check examples/prometheus/alerts.yaml. Both are tools,
# not services: `up` installs them when missing and starts nothing.
tools_up() {
    local pkgs=() policy=/usr/sbin/policy-rc.d added_policy=0 rc=0
    command -v chromium >/dev/null || pkgs+=(chromium)
    command -v promtool >/dev/null || pkgs+=(prometheus)
    ((${#pkgs[@]})) || return 0
    log "installing: ${pkgs[*]}"
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >&2 || rc=$?
    ((added_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${pkgs[*]} failed (exit $rc)"
}

# ------------------------------------------------------------------------------------- main
status() {
    local rc=0
    if command -v rabbitmq-server >/dev/null; then rabbit_status || rc=1; else
        echo "rabbitmq    not installed"; rc=1; fi
    if [[ -n $(pg_bindir) ]]; then pg_status || rc=1; else
        echo "postgres    not installed"; rc=1; fi
    if command -v redis-server >/dev/null; then redis_status || rc=1; else
        echo "redis       not installed"; rc=1; fi
    if command -v redis-server >/dev/null; then redis_cluster_status || rc=1; else
        echo "redis-cluster not installed"; rc=1; fi
    elasticmq_status || rc=1
    kafka_status || rc=1
    return $rc
}

case ${1:-} in
up)
    need_root up
    install -d -m 755 "$STATE_DIR"
    install_missing
    rabbit_up
    pg_up
    redis_up
    redis_cluster_up
    install -d -m 755 "$ELASTICMQ_DIR"
    elasticmq_up
    kafka_up
    tools_up
    status
    ;;
down)
    need_root down
    rabbit_down
    [[ -n $(pg_bindir) ]] && pg_down
    command -v redis-cli >/dev/null && redis_down
    command -v redis-cli >/dev/null && redis_cluster_down
    elasticmq_down
    kafka_down
    status || true
    ;;
status)
    status
    ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
