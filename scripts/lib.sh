# Shell helpers shared by scripts/test and scripts/run-local (sourced, not run): root or sudo,
# quiet commands, apt-get, and a RabbitMQ that answers AMQP on 127.0.0.1:5672.

log() { echo "${0##*/}: $*" >&2; }
die() { log "$*"; exit 1; }

# as root, or through sudo (which may ask for a password) for a user who has it
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "run as root, or install sudo"
    SUDO=(sudo)
fi
as_root() { "${SUDO[@]}" "$@"; }

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "python3 is required"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# run a command quietly; show its output only when it fails
quiet() {
    if ! "$@" >"$WORK/out" 2>&1; then
        cat "$WORK/out" >&2
        die "failed: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* yourself"
    if [ "$APT_UPDATED" -eq 0 ]; then
        quiet as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing $*"
    quiet as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@"
}

# True when something on 127.0.0.1:5672 answers the AMQP 0-9-1 header with Connection.Start.
amqp_answers() {
    "$PY" - <<'PYEOF' 2>/dev/null
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", 5672), timeout=3) as s:
        s.settimeout(3)
        s.sendall(b"AMQP\x00\x00\x09\x01")
        data = s.recv(3)
except OSError:
    sys.exit(1)
sys.exit(0 if data[:3] == b"\x01\x00\x00" else 1)
PYEOF
}

wait_amqp() {
    local deadline=$((SECONDS + ${1:-60}))
    while [ "$SECONDS" -lt "$deadline" ]; do
        amqp_answers && return 0
        sleep 1
    done
    return 1
}

ensure_rabbitmq() {
    amqp_answers && return 0
    if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
        apt_install rabbitmq-server
        wait_amqp 10 && return 0   # the package's postinst may have started it
    fi
    # a node that is still booting answers soon; otherwise start one
    if ! wait_amqp 5; then
        log "starting RabbitMQ (rabbitmq-server -detached)"
        as_root rabbitmq-server -detached >"$WORK/rabbit.out" 2>&1 || true
    fi
    wait_amqp 60 || {
        cat "$WORK/rabbit.out" >&2 2>/dev/null || true
        die "RabbitMQ does not answer AMQP on 127.0.0.1:5672 after 60 s (see /var/log/rabbitmq/)"
    }
}

# A memory alarm left on by an interrupted run (watermark 0) would block every publisher.
reset_memory_alarm() {
    local wm
    wm=$(as_root rabbitmqctl -q eval 'vm_memory_monitor:get_vm_memory_high_watermark().' \
        2>/dev/null || true)
    if [[ "$wm" =~ ^0(\.0*)?$ ]]; then
        log "resetting vm_memory_high_watermark to 0.4 (it was $wm)"
        quiet as_root rabbitmqctl set_vm_memory_high_watermark 0.4
    fi
}

