# Child processes that never outlive a recipe (sourced by recipes/*.sh; bash >= 4.4).
#
#   start_child CMD...   start CMD in the background, leading its own process group (setsid); its pid in CHILD
#   wait_child PID       wait for it, forget it; returns its exit status
#   run_child CMD...     start_child + wait_child: a foreground command that a stop signal does not wait for
#   stop_child PID       SIGTERM its process group, SIGKILL what is left after CHILD_GRACE seconds (default 60)
#
# On SIGINT, SIGTERM or SIGHUP the recipe stops every child it still has and exits 128+signal; on any other exit (the
# end, a failing step under `set -e`, `exit N`) it stops them too. Why children are not plain foreground
# commands: bash runs a trap only once the foreground command has ended (a signal would wait for a whole
# training run), while a `wait` is cut short at once. Children ignore SIGINT (a background command of a
# non-interactive shell does) and get SIGTERM from here: a terminal's Ctrl-C stops them in order, the
# trainer committing first. Each child's own children are stopped with it (its process group). A recipe
# killed with SIGKILL cannot stop anything: its children keep running (`simkit serve`'s workers do not).

CHILDREN=()
CHILD_GRACE=${CHILD_GRACE:-60}

start_child() {  # start_child CMD...  → CHILD
  if command -v setsid >/dev/null; then setsid "$@" <&0 & else "$@" <&0 & fi  # <&0: keep a here-document
  CHILD=$!
  CHILDREN+=("$CHILD")
}

wait_child() {  # wait_child PID
  local rc=0
  wait "$1" || rc=$?
  _forget_child "$1"
  return "$rc"
}

run_child() {  # run_child CMD...
  start_child "$@"
  wait_child "$CHILD"
}

stop_child() {  # stop_child PID
  _signal_child TERM "$1"
  _reap_child "$1"
}

stop_children() {  # every child still running: SIGTERM all of them, then reap each
  trap '' HUP INT TERM  # a second Ctrl-C must not cut the clean-up short
  local pid
  for pid in "${CHILDREN[@]}"; do _signal_child TERM "$pid"; done
  for pid in "${CHILDREN[@]}"; do _reap_child "$pid"; done
}

_signal_child() {  # _signal_child SIG PID: its process group, else (no setsid) the process alone
  kill -"$1" -- "-$2" 2>/dev/null || kill -"$1" "$2" 2>/dev/null || true
}

_reap_child() {  # _reap_child PID: wait up to CHILD_GRACE s for it, then SIGKILL what is left of its group
  local i
  for ((i = 0; i < CHILD_GRACE * 5; i++)); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.2
  done
  _signal_child KILL "$1"
  wait "$1" 2>/dev/null || true
  _forget_child "$1"
}

_forget_child() {
  local pid keep=()
  for pid in "${CHILDREN[@]}"; do [[ $pid == "$1" ]] || keep+=("$pid"); done
  CHILDREN=("${keep[@]}")
}

trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
trap stop_children EXIT
