# Sourced by the gpu_*.sh scripts: a deadline for the whole call and steps that run only if
# the seconds they are given are still left, most important first.
#   STEPS   which step names run (default: all the script names)
#   DEADLINE seconds the script may take in all (default 560: a call is limited to 600)
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
step() {  # step NAME SECONDS CMD...: run CMD under a timeout if SECONDS are still left
    local name=$1 need=$2; shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local left=$(( DEADLINE - ($(date +%s) - T0) ))
    if (( left < need )); then echo "== $name: skipped ($left s left, needs $need)"; return; fi
    echo "== $name (t=$(( $(date +%s) - T0 )) s)"
    timeout "$need" "$@" > "$OUT/$name.log" 2>&1
    echo "   rc=$? in $(( $(date +%s) - T0 )) s"
    pkill -9 -f "runtime\.(cli|worker_main)" 2>/dev/null && sleep 2  # a server left by a step out of time
    tail -n "${TAIL:-14}" "$OUT/$name.log" | grep -v "^row\|Writing\|it/s\]"
}
