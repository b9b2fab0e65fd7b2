#!/usr/bin/env bash
# decode_check.sh — the GPU inference engine in one command: build, the GPU
# decode tests (and the CPU inference tests, unbroken), compute-sanitizer
# memcheck on a few decode steps, then the decode benchmark against PyTorch.
# Logs under $OUT (or ./decode_check_logs); a short table last.
#
#   bash benchmarks/decode_check.sh                 # everything (a few minutes)
#   bash benchmarks/decode_check.sh build test      # chosen stages: build test sanitize bench
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-$PWD/decode_check_logs}"
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STAGES="${*:-build test sanitize bench}"
declare -A RESULT

run() {  # run NAME CMD...: log to $LOG/NAME.log, remember pass/fail and seconds
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    if "$@" >"$LOG/$name.log" 2>&1; then RESULT[$name]="ok ($((SECONDS - t0))s)"
    else RESULT[$name]="FAILED rc=$? ($((SECONDS - t0))s), see $LOG/$name.log"; fi
    tail -n 4 "$LOG/$name.log"
}

for stage in $STAGES; do
    case $stage in
    build)
        run build env SMEDJAN_CUDA=1 python3 setup.py build_ext --inplace ;;
    test)
        run test_decode python3 -m pytest -q -rs tests/test_cuda_decode.py
        run test_infer_cpu python3 -m pytest -q tests/test_infer.py tests/test_bench.py ;;
    sanitize)
        CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
        if [ -z "$CS" ]; then RESULT[memcheck]="skipped: compute-sanitizer not found"; continue; fi
        run memcheck "$CS" --tool memcheck --leak-check no --error-exitcode 1 python3 benchmarks/decode_once.py ;;
    bench)
        run bench python3 benchmarks/bench_decode_gpu.py --out "$LOG" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
done

echo
if [ -f "$LOG/bench.log" ]; then sed -n '/^# GPU decode/,$p' "$LOG/bench.log"; fi
for t in test_decode test_infer_cpu; do
    if [ -f "$LOG/$t.log" ]; then echo "$t: $(tail -n 1 "$LOG/$t.log")"; fi
done
echo "| stage | result |"
echo "|---|---|"
for k in "${!RESULT[@]}"; do echo "| $k | ${RESULT[$k]} |"; done | sort
for k in "${!RESULT[@]}"; do case ${RESULT[$k]} in FAILED*) exit 1 ;; esac; done
exit 0
