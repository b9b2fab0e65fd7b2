#!/usr/bin/env bash
# gpu_check.sh — build in place, run the GPU tests, compute-sanitizer
# memcheck and racecheck on a small train step (memcheck on decode steps),
# the benchmarks against PyTorch; print a short table last. Logs under $OUT
# (or ./gpu_check_logs).
#
#   benchmarks/gpu_check.sh              # everything (about 10-15 minutes)
#   benchmarks/gpu_check.sh build decode # chosen stages: build test slow sanitize bench bench-quick decode
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-$PWD/gpu_check_logs}"
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES="${*:-build test slow sanitize bench decode}"
declare -A RESULT
JOBS=$(nproc 2>/dev/null || echo 4)

run() {  # run NAME CMD...: log to $LOG/NAME.log, remember pass/fail and seconds
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    if "$@" >"$LOG/$name.log" 2>&1; then RESULT[$name]="ok ($((SECONDS - t0))s)"
    else RESULT[$name]="FAILED rc=$? ($((SECONDS - t0))s), see $LOG/$name.log"; fi
    tail -n 5 "$LOG/$name.log"
}

for stage in $STAGES; do
    case $stage in
    build)
        run build env SMEDJAN_CUDA=1 MAX_JOBS=$JOBS python3 setup.py build_ext --inplace
        python3 -c "import smedjan, json; print(json.dumps(smedjan.build_info()))" | tee "$LOG/build_info.json" ;;
    test)
        run test python3 -m pytest -q -rs tests/test_cuda.py -m "not slow" --junitxml="$LOG/test_cuda.xml"
        run test_cpu python3 -m pytest -q -x tests/ --ignore=tests/test_cuda.py -m "not slow" ;;
    slow)
        run slow python3 -m pytest -q -rs tests/test_cuda.py -m slow ;;
    sanitize)
        CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
        if [ -z "$CS" ]; then RESULT[memcheck]="skipped: compute-sanitizer not found"; continue; fi
        for dt in bf16 fp32; do
            run memcheck_$dt "$CS" --tool memcheck --leak-check no --error-exitcode 1 python3 benchmarks/probes/train_step_once.py $dt
        done
        run racecheck "$CS" --tool racecheck --error-exitcode 1 python3 benchmarks/probes/train_step_once.py bf16
        run memcheck_levers "$CS" --tool memcheck --leak-check no --error-exitcode 1 python3 benchmarks/probes/train_step_once.py bf16 cheap_recompute,fused_ce
        run memcheck_decode "$CS" --tool memcheck --leak-check no --error-exitcode 1 python3 benchmarks/probes/decode_once.py
        run racecheck_decode "$CS" --tool racecheck --error-exitcode 1 python3 benchmarks/probes/decode_once.py
        run synccheck "$CS" --tool synccheck --error-exitcode 1 python3 benchmarks/probes/train_step_once.py bf16
        run build_decode_probe_sanitize nvcc -O3 -std=c++17 -Icsrc -Icuda -arch=sm_90a \
            benchmarks/probes/decode_probe.cu -o "$LOG/decode_probe_plain"
        # small: 8-warp blocks; medium: 16-warp blocks, QKV and attention in clusters
        for shape in small medium; do
            for tool in memcheck racecheck synccheck; do
                run ${tool}_decode_probe_$shape "$CS" --tool $tool --error-exitcode 1 "$LOG/decode_probe_plain" $shape 3
            done
        done
        # the Hopper kernels on their own (TMA, wgmma), odd shapes included
        for k in gemm attention; do
            run build_${k}_sm90 nvcc -O3 -std=c++17 -Icsrc -Icuda -gencode arch=compute_90a,code=sm_90a \
                benchmarks/probes/${k}_sm90_check.cu -lcublasLt -lcuda -o "$LOG/${k}_sm90_check"
            run memcheck_${k}_sm90 "$CS" --tool memcheck --error-exitcode 1 "$LOG/${k}_sm90_check" --check-only
        done ;;
    bench)
        run bench python3 benchmarks/vs_torch.py ;;
    bench-quick)
        run bench python3 benchmarks/vs_torch.py --quick ;;
    decode)   # the GPU inference engine: its tests, then batch-1 decode against PyTorch
        run test_decode python3 -m pytest -q -rs tests/test_cuda_decode.py tests/test_cuda_decode_options.py
        run build_decode_probe nvcc -O3 -std=c++17 -Icsrc -Icuda -arch=sm_90a -DDEC_TRACE \
            benchmarks/probes/decode_probe.cu -o "$LOG/decode_probe"
        for shape in small medium smollm2; do run decode_probe_$shape "$LOG/decode_probe" $shape; done
        run bench_decode python3 benchmarks/bench_decode_gpu.py --out "$LOG/decode_gpu.md" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
done

echo
if [ -f "$LOG/bench.log" ]; then sed -n '/^# smedjan vs PyTorch/,$p' "$LOG/bench.log"; fi
if [ -f "$LOG/bench_decode.log" ]; then sed -n '/^# GPU decode/,$p' "$LOG/bench_decode.log"; fi
if [ -f "$LOG/test.log" ]; then echo "tests: $(tail -n 1 "$LOG/test.log")"; fi
echo "| stage | result |"
echo "|---|---|"
for k in "${!RESULT[@]}"; do echo "| $k | ${RESULT[$k]} |"; done | sort
for k in "${!RESULT[@]}"; do case ${RESULT[$k]} in FAILED*) exit 1 ;; esac; done
exit 0
