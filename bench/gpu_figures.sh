#!/usr/bin/env bash
# Every GPU figure of the README's speed section, most important first, into one folder:
#
#     bash bench/gpu_figures.sh results/gpu            # about 20 minutes on an H200, most of it compiling
#
# Each benchmark writes its JSON after every row it measures, so a run that is stopped early keeps what it got;
# log.txt collects the output line by line. PYTHON names the interpreter (default python3).
set -uo pipefail
out="${1:?usage: bash bench/gpu_figures.sh OUTPUT_FOLDER}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/log.txt"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run() { echo "== $*" | tee -a "$log"; "$@" 2>&1 | grep --line-buffered -v cuda_timer | tee -a "$log"; }

step="${PYTHON:-python3} bench/bench_train_step.py --config nyuv2 --peak-tflops 989 --repeats 10"
run ${PYTHON:-python3} bench/bench_atrous.py --batch 16 --precisions bfloat16,float32 --repeats 20 \
    --out "$out/bench_atrous.json"
run $step --precisions bfloat16 --trace "$out/trace" --out "$out/bench_train_step_nyuv2.json"
run $step --precisions bfloat16 --variant authors --out "$out/bench_train_step_nyuv2_authors.json"
run $step --precisions float32 --methods ew,core,core_no_cfa --out "$out/bench_train_step_nyuv2_float32.json"
