#!/usr/bin/env bash
# What launch/launch.py tpu runs on every host of a TPU slice, from the repository's folder there:
#
#   launch/tpu_host.sh python            the Python (>= 3.11) the virtual environment is made with
#   launch/tpu_host.sh setup             .venv with the package and jax[tpu] (kept while setup.py is unchanged)
#   launch/tpu_host.sh check PATH...     every PATH exists here (gs:// ones through gcloud); exit 2 naming one that doesn't
#   launch/tpu_host.sh stop              ends the previous run (SIGTERM: it saves a checkpoint) and whatever holds the TPU
#   launch/tpu_host.sh start LOGDIR CMD  CMD in a session of its own (no SSH hang-up reaches it), its output in
#                                        LOGDIR/host_<worker>.log (LOGDIR may be gs://: copied there every minute)
#
# Stock TPU VM images (Ubuntu 22.04) ship Python 3.10 and the package needs 3.11: setup takes the image's
# python3 where it is new enough, else a python3.1x on the PATH, else Ubuntu's python3.11 from apt, else a
# CPython that uv (from PyPI) installs.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."

PIDFILE=${SRDD_PIDFILE:-$HOME/.srdd_jax_run.pid}
GRACE=${SRDD_STOP_GRACE:-180}  # Seconds a previous run gets to save its checkpoint before SIGKILL.
SUDO=''
if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then SUDO='sudo -n'; fi

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

find_python() {
  local p
  for p in ${SRDD_PYTHON:-} python3 python3.13 python3.12 python3.11; do
    if command -v "$p" >/dev/null 2>&1 && new_enough "$p"; then command -v "$p"; return 0; fi
  done
  return 1
}

uv_bin() {
  # From PyPI into the user's site: no root needed, and the image's pip is enough to get it.
  if ! command -v uv >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/uv" ]; then
    python3 -m pip install --user --quiet uv >&2
  fi
  command -v uv 2>/dev/null || echo "$HOME/.local/bin/uv"
}

provision_python() {
  local py
  if py=$(find_python); then echo "$py"; return 0; fi
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    echo "python3 is $(python3 --version 2>&1); installing Ubuntu's python3.11" >&2
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3.11 python3.11-venv; } >&2 || true
    if py=$(find_python); then echo "$py"; return 0; fi
  fi
  echo "no Python >= 3.11 from apt; a standalone CPython 3.11 through uv" >&2
  local uv; uv=$(uv_bin)
  "$uv" python install 3.11 >&2
  "$uv" python find 3.11
}

setup() {
  local stamp
  stamp=$(sha256sum setup.py | cut -d' ' -f1)
  if [ -x .venv/bin/python ] && new_enough .venv/bin/python && [ "$(cat .venv/.installed 2>/dev/null)" = "$stamp" ]; then
    echo "$(hostname): .venv is up to date ($(.venv/bin/python --version))"; return 0
  fi
  local py; py=$(provision_python)
  rm -rf .venv
  if ! "$py" -m venv .venv 2>/dev/null; then
    rm -rf .venv  # A Python without ensurepip (Ubuntu's, without its -venv package): uv makes the venv.
    "$(uv_bin)" venv --seed --python "$py" .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[tpu]'
  echo "$stamp" > .venv/.installed
  echo "$(hostname): .venv made with $(.venv/bin/python --version)"
}

gs_exists() {  # A bucket (which may be empty), or an object or prefix with something under it.
  if [[ "$1" =~ ^gs://[^/]+/?$ ]]; then gcloud storage buckets describe "${1%/}" >/dev/null 2>&1; return; fi
  (set +o pipefail; gcloud storage ls "$1" 2>/dev/null | head -n 1 | grep -q .)
}

check() {
  local p missing=0
  for p in "$@"; do
    case "$p" in
      gs://*) gs_exists "$p" || { echo "error: $p does not exist or cannot be read (from $(hostname))" >&2; missing=1; } ;;
      *) [ -e "$p" ] || { echo "error: $p does not exist on $(hostname) (in $(pwd))" >&2; missing=1; } ;;
    esac
  done
  [ "$missing" = 0 ] || exit 2
}

# Processes with a TPU device open: /dev/accel* (v4, v5p), /dev/vfio/N (v5e, v6e). Read from /proc, so
# nothing beyond bash is needed; another user's processes are seen with root (sudo).
holders() {
  local devs=${SRDD_TPU_DEVICES:-$(ls /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true)}
  [ -n "$devs" ] || return 0
  local d names=()
  for d in $devs; do names+=(${names[@]:+-o} -lname "$d"); done
  find /proc/[0-9]*/fd -maxdepth 1 \( "${names[@]}" \) -printf '%h\n' 2>/dev/null \
    | sed 's#^/proc/\([0-9]*\)/fd$#\1#' | sort -u || true
}

# A zombie (ended, not yet reaped by its parent) still answers kill -0 but holds nothing: it counts as ended.
alive() {
  local p=${*: -1}
  case "$p" in -*) ;; *) [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ] || return 1 ;; esac
  kill -0 "$@" 2>/dev/null || $SUDO kill -0 "$@" 2>/dev/null
}

stop_pids() {  # SIGTERM, up to GRACE seconds, then SIGKILL. Arguments: pids, or -PGID for a group.
  [ $# -gt 0 ] || return 0
  kill -TERM -- "$@" 2>/dev/null || $SUDO kill -TERM -- "$@" 2>/dev/null || true
  local i
  for ((i = 0; i < GRACE; i++)); do
    local p any=0
    for p in "$@"; do alive -- "$p" && any=1; done
    [ "$any" = 1 ] || return 0
    sleep 1
  done
  echo "$(hostname): still running after ${GRACE} s, killed: $*"
  kill -KILL -- "$@" 2>/dev/null || $SUDO kill -KILL -- "$@" 2>/dev/null || true
}

stop() {
  if [ -f "$PIDFILE" ]; then
    local pg; pg=$(cat "$PIDFILE")
    if alive -- "-$pg"; then
      echo "$(hostname): stopping the previous run (process group $pg; SIGTERM saves its checkpoint)"
      stop_pids "-$pg"
    fi
    rm -f "$PIDFILE"
  fi
  local pids
  pids=$(if [ -n "$SUDO" ]; then $SUDO env SRDD_TPU_DEVICES="${SRDD_TPU_DEVICES:-}" bash "$SELF" holders; else holders; fi)
  if [ -n "$pids" ]; then
    echo "$(hostname): ending what holds the TPU: $(ps -o pid=,comm= -p "$(echo $pids | tr ' ' ,)" \
      | awk '{printf "%s%s %s", (NR > 1 ? "; " : ""), $1, $2}')"
    # shellcheck disable=SC2086
    stop_pids $pids
  fi
  # Left by a killed process, it keeps the next libtpu from starting.
  $SUDO rm -f "${SRDD_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}" 2>/dev/null || true
}

worker_id() {
  if [ -n "${SRDD_HOST_ID:-}" ]; then echo "$SRDD_HOST_ID"; return; fi
  curl -sf --max-time 3 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null \
    || hostname
}

# The detached run: CMD, then its exit status, into the log; a gs:// log is written here and copied up.
run() {
  local logdir=$1 cmd=$2 name
  name="host_$(worker_id).log"
  local log="$logdir/$name" upload=''
  case "$logdir" in
    gs://*) mkdir -p "$HOME/srdd_logs"; log="$HOME/srdd_logs/$name"; upload="$logdir/$name" ;;
    *) mkdir -p "$logdir" ;;
  esac
  echo "$(date -u +%FT%TZ) $(hostname): $cmd" >> "$log"
  bash -c "$cmd" >> "$log" 2>&1 &
  local child=$!
  if [ -n "$upload" ]; then
    while alive "$child"; do gcloud storage cp -q "$log" "$upload" >/dev/null 2>&1 || true; sleep 60; done
  fi
  local rc=0
  wait "$child" || rc=$?
  echo "$(date -u +%FT%TZ) $(hostname): exit status $rc" >> "$log"
  [ -z "$upload" ] || gcloud storage cp -q "$log" "$upload" >/dev/null 2>&1 || true
  rm -f "$PIDFILE"
  return "$rc"
}

start() {
  local logdir=$1 cmd=$2
  # setsid: a session (and process group) of its own, so the SSH session's hang-up never reaches it, and
  # `stop` ends the whole group.
  setsid nohup bash "$SELF" run "$logdir" "$cmd" > /dev/null 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  echo "$(hostname): started (process group $!), log: $logdir/host_$(worker_id).log"
}

case "${1:-}" in
  python) provision_python ;;
  setup) setup ;;
  check) shift; check "$@" ;;
  holders) holders ;;
  stop) stop ;;
  start) [ $# = 3 ] || { echo "usage: launch/tpu_host.sh start LOGDIR CMD" >&2; exit 2; }; start "$2" "$3" ;;
  run) run "$2" "$3" ;;
  *) echo "usage: launch/tpu_host.sh python|setup|check PATH...|stop|start LOGDIR CMD" >&2; exit 2 ;;
esac
