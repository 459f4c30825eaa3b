#!/usr/bin/env bash
# Refresh the GPU numbers on a fresh GPU machine without network, in one or two device runs:
#
#   bench/gpu_run.sh OUTDIR [STAGE ...]      stages: tests ops e2e qlora full (default: tests ops e2e)
#
# tests: the `gpu`-marked tests; ops: the op benchmarks (cross-entropy, AdamW, NF4 LoRA); e2e: the trainer against
# the HF Trainer (QLoRA and full, LAMELM_BENCH_STEPS steps, default 200) and, with LAMELM_BENCH_MAX_CONTEXT=1, the
# max-context probe; qlora / full: one half of e2e each (the probe goes with qlora). Each stage is bounded by
# `timeout` so the whole call ends inside the 10-minute limit of one device command: run `tests ops` and `e2e` (or
# `qlora`, then `full`, when 200 steps of both do not fit) as separate calls.
#
# Installs the wheels that ../shared/tools/prepare-gpu-wheels put in .whl/ (carry .whl), then the project itself
# (building the CUDA extension when nvcc is there). Writes to OUTDIR few files (the device tool returns at most 8):
# the results JSON + Markdown (bench/results format: copy the JSON to bench/results/, then run
# `python bench/report.py`), device.txt, install.log and run.log (every stage's output).
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu_run.sh OUTDIR [tests] [ops] [e2e]}
STAGES="${*:2}"; STAGES=${STAGES:-tests ops e2e}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LAMELM_BENCH_RESULTS="$OUTDIR"
cd "$(dirname "$0")/.."

if [ -f .whl/install.sh ]; then
  bash .whl/install.sh && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUTDIR/install.log" 2>&1 \
  || { echo "project install failed, see install.log"; tail -20 "$OUTDIR/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/device.txt"

want() { [[ " $STAGES " == *" $1 "* ]]; }
status=0
if want tests; then
  timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee -a "$OUTDIR/run.log" | tail -25
  status=$((status | PIPESTATUS[0]))
fi
if want ops; then
  timeout 300 python3 -m pytest -q bench --benchmark-only -p no:cacheprovider --ignore=bench/test_end_to_end.py \
    2>&1 | tee -a "$OUTDIR/run.log" | tail -25
  status=$((status | PIPESTATUS[0]))
fi
for stage in e2e qlora full; do
  want $stage || continue
  select=(); [ $stage = e2e ] || select=(-k "$stage")
  timeout 540 python3 -m pytest -q bench/test_end_to_end.py --benchmark-only -p no:cacheprovider "${select[@]}" \
    2>&1 | tee -a "$OUTDIR/run.log" | tail -25
  status=$((status | PIPESTATUS[0]))
done
exit $status
