#!/usr/bin/env bash
# Refresh the GPU numbers on a fresh GPU machine without network, in a few device runs of at most 10 minutes:
#
#   bench/gpu_run.sh OUTDIR [STAGE ...]      default: tests ops
#
# Stages, run in the order given:
#   tests   the `gpu`-marked tests but the convergence runs and torch.compile's (stage compile-tests); ~6 min on an H100,
#           most of it Triton compiling each test's kernels
#   convergence   the trainer with its kernels against the torch references, 40 steps each of full / LoRA / QLoRA
#   ops     the op benchmarks: ce adamw layers nf4 (each is also a stage of its own)
#   layers  the fused layers around the matmuls: norm (RMSNorm) swiglu rope, and attention over packed rows
#           (varlen against sdpa's block mask); each a stage of its own too
#   e2e     the trainer against the HF Trainer, QLoRA and full (LAMELM_BENCH_STEPS steps, default 200), and with
#           LAMELM_BENCH_MAX_CONTEXT=1 the max-context probe; qlora / full run one half each (the probe goes with
#           qlora) when 200 steps of both do not fit one call.
#   checkpointing   our QLoRA step under the two checkpointing policies (full, keep_attention), short and long rows
#   compiled   QLoRA and full, 40 steps each of the HF Trainer, ours eager and ours with compiled decoder layers
#           (--compile): does compiling take back the host time of an eager step (~3 min per variant with the compile)
#   compile-tests   tests/test_torch_compile.py's `gpu` tests: compiled equals eager with inductor under bf16
#           autocast, varlen attention, QLoRA's custom ops, CUDA graphs (~3-4 min: each test compiles from scratch)
#   compile   the Llama-3.2-1B training step, HF and apply_kernels, eager and compiled (two cold inductor compiles of
#           the 1B model: ~3-5 min); with compile-tests it may not fit one call, the budget then skips what is left
# The whole script keeps inside LAMELM_GPU_BUDGET_S seconds (default 560, under the device command's 10 minutes):
# each stage gets at most its own cap and what is left, is interrupted (SIGINT: pytest still reports) when it runs
# over, and a stage with less than 30 s left is skipped. Results are written after every measured row, so a stage
# cut short keeps what it measured.
#
# Installs the wheels that ../shared/tools/prepare-gpu-wheels put in .whl/ (carry .whl), then the project itself
# (building the CUDA extension when nvcc is there). Writes to OUTDIR few files (the device tool returns at most 8):
# the results JSON + Markdown (bench/results format: copy the JSON to bench/results/, then run
# `python bench/report.py --readme README.md`), device.txt, install.log and run.log (every stage's output).
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu_run.sh OUTDIR [tests] [convergence] [ops|ce adamw layers|norm swiglu rope attention nf4] [e2e|qlora full] [checkpointing] [compiled] [compile-tests] [compile]}
shift
STAGES=("$@"); [ ${#STAGES[@]} -gt 0 ] || STAGES=(tests ops)
KNOWN=(tests convergence ops ce adamw layers norm swiglu rope attention nf4 e2e qlora full checkpointing compiled
       compile-tests compile)
for name in "${STAGES[@]}"; do  # every stage checked before the first one spends the GPU's minutes
  [[ " ${KNOWN[*]} " == *" $name "* ]] || { echo "unknown stage $name: choose from ${KNOWN[*]}"; exit 2; }
done
BUDGET=${LAMELM_GPU_BUDGET_S:-560}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)  # absolute: the script changes directory below
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LAMELM_BENCH_RESULTS="$OUTDIR"
cd "$(dirname "$0")/.."
# Before anything is installed: on a machine without a GPU the suite is `pytest bench --benchmark-only`.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUTDIR/device.txt" 2>&1 \
  || { echo "no GPU here (nvidia-smi: $(head -1 "$OUTDIR/device.txt")): this script spends a lent GPU's minutes;" \
         "the CPU suite is pytest bench --benchmark-only"; exit 1; }
cat "$OUTDIR/device.txt"

if [ -f .whl/install.sh ]; then
  # No empty entry: an empty PYTHONPATH entry means the working directory, whose lamelm_fast lacks .kernels
  bash .whl/install.sh && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# A warm machine (a second call) already has this checkout installed, its CUDA extension built in place: skip the
# install (and nvcc's minute) then.
# lamelm_fast.kernels is the proof of an install: imported straight from the checkout, lamelm_fast lacks it.
if python3 -c "import lamelm_fast.kernels, pathlib, sys
sys.exit(pathlib.Path(lamelm_fast.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())" 2>/dev/null; then
  echo "lamelm-fast is installed from this checkout already: install skipped" >"$OUTDIR/install.log"
else
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUTDIR/install.log" 2>&1 \
    || { echo "project install failed, see install.log"; tail -20 "$OUTDIR/install.log"; exit 1; }
fi
# Every stage imports the installed package: stop here, not in each stage, if it is not the one installed from here.
python3 -c "import lamelm_fast.kernels" 2>>"$OUTDIR/install.log" \
  || { echo "lamelm_fast.kernels does not import (PYTHONPATH=${PYTHONPATH:-}), see install.log"; exit 1; }

status=0
stage() {  # stage NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2 left=$((BUDGET - SECONDS))
  shift 2
  if [ $left -lt 30 ]; then
    echo "== $name: skipped, the time budget is spent" | tee -a "$OUTDIR/run.log"; status=1; return
  fi
  [ $left -lt "$cap" ] && cap=$left
  echo "== $name (at most ${cap}s)" | tee -a "$OUTDIR/run.log"
  local started=$SECONDS
  timeout -s INT -k 20 "$cap" "$@" 2>&1 | tee -a "$OUTDIR/run.log" | tail -25
  local rc=${PIPESTATUS[0]}
  status=$((status | rc))
  # How long each stage took, for planning the next GPU session's calls.
  echo "== $name: exit $rc after $((SECONDS - started))s ($((BUDGET - SECONDS))s of the budget left)" \
    | tee -a "$OUTDIR/run.log"
}
BENCH=(python3 -m pytest -q --benchmark-only -p no:cacheprovider)
for name in "${STAGES[@]}"; do
  case $name in
    tests) stage tests 420 python3 -m pytest -q -m gpu tests -p no:cacheprovider \
             --ignore tests/test_convergence_gpu.py --ignore tests/test_torch_compile.py ;;
    convergence) stage convergence 240 python3 -m pytest -q -m gpu tests/test_convergence_gpu.py -p no:cacheprovider ;;
    ops) stage ce 150 "${BENCH[@]}" bench/test_cross_entropy.py
         stage adamw 90 "${BENCH[@]}" bench/test_adamw.py
         stage layers 150 "${BENCH[@]}" bench/test_rms_norm.py bench/test_swiglu.py bench/test_rope.py \
           bench/test_packed_attention.py
         stage nf4 240 "${BENCH[@]}" bench/test_nf4_lora.py ;;
    layers) stage layers 300 "${BENCH[@]}" bench/test_rms_norm.py bench/test_swiglu.py bench/test_rope.py \
              bench/test_packed_attention.py ;;
    attention) stage attention 300 "${BENCH[@]}" bench/test_packed_attention.py ;;
    ce) stage ce 300 "${BENCH[@]}" bench/test_cross_entropy.py ;;
    adamw) stage adamw 300 "${BENCH[@]}" bench/test_adamw.py ;;
    nf4) stage nf4 400 "${BENCH[@]}" bench/test_nf4_lora.py ;;
    norm) stage norm 300 "${BENCH[@]}" bench/test_rms_norm.py ;;
    swiglu) stage swiglu 300 "${BENCH[@]}" bench/test_swiglu.py ;;
    rope) stage rope 300 "${BENCH[@]}" bench/test_rope.py ;;
    e2e) stage e2e 540 "${BENCH[@]}" bench/test_end_to_end.py -k "not checkpointing_policy and not compiled_trainer" ;;
    qlora | full) stage "$name" 540 "${BENCH[@]}" bench/test_end_to_end.py \
                    -k "$name and not checkpointing_policy and not compiled_trainer" ;;
    compiled) stage compiled 540 "${BENCH[@]}" bench/test_end_to_end.py -k compiled_trainer ;;
    checkpointing) stage checkpointing 240 "${BENCH[@]}" bench/test_end_to_end.py -k checkpointing_policy ;;
    compile-tests) stage compile-tests 300 python3 -m pytest -q -m gpu tests/test_torch_compile.py \
                     -p no:cacheprovider ;;
    compile) stage compile 420 "${BENCH[@]}" bench/test_compile.py ;;
  esac
done
exit $status
