#!/usr/bin/env bash
# One call on a freshly started GPU machine (torch + triton preinstalled, no internet):
#   1. install what is missing (best effort: pytest-benchmark and matplotlib are optional)
#   2. build the CUDA extension for the GPU that is there
#   3. run the whole test suite on CUDA tensors, every backend (junit XML)
#   4. python -m bench.memory, then python -m bench.report within what is left of the budget
#   5. copy bench/results/, the junit XML and the logs to $OUT when it is set
# Everything must fit in one 10-minute call: TOTAL_S (default 570) is split between the parts;
# each part has its own timeout and the report gets what is left (goal shapes first).
# Usage: bash bench/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-570}
BUILD_S=${BUILD_S:-200}
TESTS_S=${TESTS_S:-210}
LOGS=${OUT:-bench/results}/gpu_check_logs
mkdir -p "$LOGS" bench/results
elapsed() { echo $(( $(date +%s) - T0 )); }
part() { echo "== [$(elapsed) s] $*"; }
unset TRITON_INTERPRET RLHF_OPS_BACKEND
PY=${PYTHON:-python}

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

part "install what is missing (no internet: best effort, 20 s each)"
for mod_pkg in pytest:pytest numpy:numpy ninja:ninja pybind11:pybind11 matplotlib:matplotlib \
               tqdm:tqdm pytest_benchmark:pytest-benchmark; do
  mod=${mod_pkg%%:*}; pkg=${mod_pkg##*:}
  if ! $PY -c "import $mod" 2>/dev/null; then
    echo "missing $pkg: trying pip"
    timeout 20 $PY -m pip install -q --retries 0 --timeout 5 "$pkg" >"$LOGS/pip_$pkg.log" 2>&1 \
      && echo "  installed $pkg" || echo "  could not install $pkg (see $LOGS/pip_$pkg.log)"
  fi
done
ADDOPTS="-ra"  # pyproject's addopts name --benchmark-disable, which needs pytest-benchmark
$PY -c "import pytest_benchmark" 2>/dev/null && ADDOPTS="-ra --benchmark-disable"

part "build the CUDA extension for this GPU"
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
b0=$(date +%s)
RLHF_OPS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=${MAX_JOBS:-16} \
  timeout "$BUILD_S" $PY -m pip install --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - b0 )) s (arch $ARCH)"; tail -3 "$LOGS/build.log"
$PY -c "import rlhf_ops, rlhf_ops._C; print('backends:', rlhf_ops.available_backends())" \
  || echo "the CUDA extension did not load: the cuda backend will be reported missing"

part "tests on CUDA tensors, every backend (timeout ${TESTS_S} s)"
t0=$(date +%s)
timeout -s INT -k 30 "$TESTS_S" $PY -m pytest -q -p no:cacheprovider tests -o addopts="$ADDOPTS" \
  --junitxml="$LOGS/junit.xml" >"$LOGS/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - t0 )) s"; tail -15 "$LOGS/tests.log"

# ---- the training loop on CUDA (rlhf_ops/train; owner: train) ----
# `python -m rlhf_ops.train all --preset tiny --device cuda` once per backend that
# rlhf_ops.available_backends() lists (reference, triton, and cuda when the extension loaded):
# all four stages, generation with the KV cache (dense and varlen decode), checkpoints and the
# report, on a GPU. Each run gets at most TRAIN_S seconds (default 45; a first triton run
# compiles its kernels) and never more than leaves 90 s for the memory table and the report.
# CPU dry run of the same command: about 10 s of CPU time per backend.
part "training loop on CUDA: tiny preset, every available backend (${TRAIN_S:-45} s each at most)"
for be in $($PY -c "import rlhf_ops; print(' '.join(rlhf_ops.available_backends()))" 2>/dev/null); do
  left=$(( TOTAL_S - $(elapsed) - 90 ))
  lim=$(( left < ${TRAIN_S:-45} ? left : ${TRAIN_S:-45} ))
  if [ "$lim" -lt 15 ]; then echo "train tiny, backend $be: NOT run (no time left in the budget)"; continue; fi
  t0=$(date +%s)
  timeout -k 5 "$lim" $PY -m rlhf_ops.train all --preset tiny --device cuda --backend "$be" \
    --out "$LOGS/train_tiny_$be" --set run.progress=false >"$LOGS/train_tiny_$be.log" 2>&1
  rc=$?
  echo "train tiny on cuda, backend $be: rc=$rc in $(( $(date +%s) - t0 )) s (limit $lim s)"
  if [ $rc -eq 0 ]; then
    $PY -c "import json, sys; s = json.load(open(sys.argv[1])); print({k: round(s[k], 4) for k in ('pretrain.final_loss', 'sft.judge_score', 'rm.heldout_pair_accuracy', 'ppo.judge_score', 'ppo.kl_mean', 'ppo_ptx.pretrain_loss')})" "$LOGS/train_tiny_$be/summary.json"
  else
    tail -5 "$LOGS/train_tiny_$be.log"
  fi
done
# ---- end of the training-loop block ----

part "memory accounting (meta device)"
$PY -m bench.memory >"$LOGS/memory.log" 2>&1 || tail -5 "$LOGS/memory.log"

LEFT=$(( TOTAL_S - $(elapsed) - 45 ))
part "benchmark report (budget ${LEFT} s)"
JUNIT=()
[ -f "$LOGS/junit.xml" ] && JUNIT=(--junit "$LOGS/junit.xml")
if [ "$LEFT" -gt 30 ]; then
  timeout -k 10 $(( LEFT + 40 )) $PY -m bench.report --budget-s "$LEFT" "${JUNIT[@]}" \
    >"$LOGS/report.log" 2>&1
  echo "report rc=$?"; tail -5 "$LOGS/report.log"
else
  echo "no time left for the report"
fi

if [ -n "${OUT:-}" ]; then
  part "copy results to \$OUT"
  mkdir -p "$OUT/results"
  cp -r bench/results/. "$OUT/results/" 2>/dev/null || true
fi
part "done"
