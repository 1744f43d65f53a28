#!/usr/bin/env bash
# The GPU figures of the README's speed section, into one folder, in parts sized to fit a short GPU lease:
#
#     bash bench/gpu_figures.sh results/gpu         # every part, about 30 minutes on an H200
#     bash bench/gpu_figures.sh results/gpu 1       # one part (1-7), each about 5 minutes, most of it compiling
#
#   1  bfloat16, paper variant: EW, CORE-MTL with and without the counterfactual pass, with a
#      profiler trace (the headline figures)
#   2  bfloat16, paper variant: EW and PCGrad
#   3  bfloat16, the authors' variant: EW, CORE-MTL with and without the counterfactual pass
#   4  float32, paper variant: EW, CORE-MTL with and without the counterfactual pass
#   5  bench_atrous: every dilated convolution of the model three ways, bfloat16 and float32
#   6  bfloat16: EW, and MTAN (the architecture baseline) with EW and with PCGrad
#   7  CelebA (the paper's Table 4): EW, STCH, PCGrad and CORE-MTL steps at 10 and 40 attributes, float32, timed
#
# Each part writes its own JSON, after every row it measures, so a run stopped early keeps what it got; log.txt
# collects the output line by line. PYTHON names the interpreter (default python3); TRACE_DIR where part 1 leaves
# its profiler traces (default OUTPUT_FOLDER/trace; their summary is in the JSON either way).
set -uo pipefail
usage="usage: bash bench/gpu_figures.sh OUTPUT_FOLDER [PART: 1, 2, 3, 4, 5, 6, 7 or all]"
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ]; then
    echo "gpu_figures.sh: give an output folder and at most one part ($usage)" >&2; exit 2
fi
out="$1"
part="${2:-all}"
case "$part" in
    1|2|3|4|5|6|7|all) ;;
    *) echo "gpu_figures.sh: PART must be 1, 2, 3, 4, 5, 6, 7 or all; got '$part' ($usage)" >&2; exit 2 ;;
esac
given="$out"
reason="$(mkdir -p -- "$given" 2>&1)" && out="$(CDPATH= cd -- "$given" && pwd)" && [ -w "$out" ] \
    || { echo "gpu_figures.sh: cannot write to the folder '$given'${reason:+ (${reason##*: })}" >&2; exit 2; }
log="$out/log.txt"
trace="${TRACE_DIR:-$out/trace}"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
run() {
    echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"
    "$@" 2>&1 | grep --line-buffered -v cuda_timer | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "== failed: $1 ${2:-}" | tee -a "$log"; failed=1; }
}
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }

step="$python bench/bench_train_step.py --config nyuv2 --peak-tflops 989 --repeats 10"
run $python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
want 1 && run $step --precisions bfloat16 --methods ew,core,core_no_cfa --trace "$trace" \
    --out "$out/bench_train_step_nyuv2.json"
want 2 && run $step --precisions bfloat16 --methods ew,pcgrad --out "$out/bench_train_step_nyuv2_pcgrad.json"
want 3 && run $step --precisions bfloat16 --methods ew,core,core_no_cfa --variant authors \
    --out "$out/bench_train_step_nyuv2_authors.json"
want 4 && run $step --precisions float32 --methods ew,core,core_no_cfa \
    --out "$out/bench_train_step_nyuv2_float32.json"
want 5 && run $python bench/bench_atrous.py --batch 16 --precisions bfloat16,float32 --repeats 20 \
    --out "$out/bench_atrous.json"
want 6 && run $step --precisions bfloat16 --methods ew,mtan_ew,mtan_pcgrad --out "$out/bench_train_step_nyuv2_mtan.json"
want 7 && run $python bench/bench_celeba_scaling.py --time --tasks 10,40 --repeats 5 \
    --out "$out/bench_celeba_scaling_celeba.json"
echo "== done ($(date -u +%H:%M:%S))" | tee -a "$log"
exit "$failed"
