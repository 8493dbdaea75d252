#!/usr/bin/env bash
# The GPU check of the Triton kernels, in one call on a CUDA machine (issue #18):
#   1. the Triton tests with the real compiler (tests/test_triton_*.py: launchers, the
#      module -> functional -> custom op -> Triton path, sm_90 compile reports) and the
#      >2^31-element path once (NORMLAB_HUGE_TESTS=1);
#   2. a tuning sweep of the row kernels' warps, grids and blocks (scripts/triton_sweep.py);
#   3. normlab bench --device cuda: LayerNorm and RMSNorm on the full grid (32768 rows x
#      1024..262144 features, float32 and bfloat16, forward and backward), the fused adds on
#      the quick grid (4096 and 65536 features), one JSON and Markdown file per op.
# Installs nothing: it runs the machine's python3 (torch, triton, numba, pytest, rich) on
# src/ through PYTHONPATH. Every phase has a share of a global deadline, and results are
# written per phase, so a phase cut short loses only itself.
#
#   OUT=/some/dir bash scripts/gpu_check.sh [SECONDS]       # on the GPU machine
#   OUT=/tmp/rehearsal bash scripts/gpu_check.sh --toy      # rehearsal on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

TOY=0
BUDGET=540
for arg in "$@"; do
  case "$arg" in
    --toy) TOY=1 ;;
    *) BUDGET="$arg" ;;
  esac
done
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
phase() {  # phase NAME SHARE_SECONDS CMD...: run CMD with min(SHARE, time left - 5) seconds
  local name=$1 share=$2; shift 2
  local limit; limit=$(left); limit=$(( limit - 5 < share ? limit - 5 : share ))
  if (( limit < 10 )); then echo "== $name: skipped, no time left" | tee -a "$OUT/phases.txt"; return; fi
  echo "== $name (limit ${limit}s) $(date -u +%T)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/phases.txt"
  tail -n 25 "$OUT/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/environment.txt"

if (( TOY )); then
  export TRITON_INTERPRET=1
  phase tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_rows.py \
    -k "forward_matches_reference and float32" tests/test_triton_huge.py
  phase sweep 120 "$PY" scripts/triton_sweep.py --toy
  phase bench-layer_norm 200 "$PY" -m normlab bench --device cpu --grid gpu-toy \
    --only layer_norm --reps 2 --no-compile --alloc default --no-fold \
    --json "$OUT/bench-layer_norm.json" --markdown "$OUT/bench-layer_norm.md"
  exit 0
fi

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
phase tests 170 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
  tests/test_triton_rows.py tests/test_triton_norms.py
NORMLAB_HUGE_TESTS=1 phase tests-huge 60 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_triton_huge.py
phase sweep 100 "$PY" scripts/triton_sweep.py ${SWEEP_ARGS:-}
{ grep -h '^{' "$OUT/sweep.log" || true; } >"$OUT/sweep.jsonl"
for op in layer_norm rms_norm add_layer_norm add_rms_norm; do
  case "$op" in add_*) grid=gpu-quick; share=70 ;; *) grid=gpu; share=150 ;; esac
  phase "bench-$op" "$share" "$PY" -m normlab bench --device cuda --grid "$grid" --only "$op" \
    --json "$OUT/bench-$op.json" --markdown "$OUT/bench-$op.md"
done
echo "== done in $(( $(date +%s) - START ))s"
