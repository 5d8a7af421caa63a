#!/usr/bin/env bash
# The second GPU call: the headline benchmarks at the field's shapes (bench/headline.py), under
# TOTAL_S (default 470 s; the device tool's call may run 480 s of this script):
#
#   machine          GPU, driver, versions                                              (10 s)
#   build            the CUDA extension for this GPU (as gpu_check.sh)                  (150 s)
#   peers            Liger-Kernel and Cut Cross-Entropy from the wheels carried in
#                    bench/.carry/ (bash bench/fetch_peers.sh here, then carry it)        (15 s)
#   headline         python -m bench.headline: policy head N=8192 H=4096 V=151,936;
#                    attention D=128 causal T=4k/8k/16k; CE and KL at V=32k–262k; against
#                    eager, torch.compile, SDPA/Flex, F.linear_cross_entropy, Liger, CCE   (245 s)
#   linear_logprobs  bench.bench_linear_logprobs --size quick (log-probs + entropy head)   (40 s)
#
# Back in $OUT: summary.txt, junit.xml, logs.tgz, <slug>.json and <slug>.md (the results, the
# device named: commit them as bench/results/<slug>.*; the README's tables come from them).
#
#   bash bench/fetch_peers.sh                      # here, once: the peer wheels
#   run(carry=["bench/.carry"], command="COMMIT=<sha> bash bench/gpu_bench.sh")
#   DRY_RUN=1 bash bench/gpu_bench.sh              # the plan; nothing runs
#
# Adding a benchmark is one line below: `add NAME BUDGET_S 'command'` (or one line in
# bench/headline.py's HEADLINE for a case of the harness), budgets so that `plan:` stays ≤ 480.
cd "$(dirname "$0")/.."
SCRIPT_NAME=gpu_bench.sh
TOTAL_S=${TOTAL_S:-470}
. bench/gpu_lib.sh

add machine 10 '
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1
    $PY -c "import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")"
    echo "commit ${COMMIT:-unknown}, $(nproc) cores"; } | tee "$LOGS/machine.txt"'

add build 150 'build_extension'

add peers 15 '
  ls bench/.carry/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in bench/.carry/wheels (bash bench/fetch_peers.sh, then carry bench/.carry): Liger and CCE will be reported missing"; exit 0; }
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/rlhf_ops_peers bench/.carry/wheels/*.whl || exit 1
  echo "export PYTHONPATH=/tmp/rlhf_ops_peers\${PYTHONPATH:+:\$PYTHONPATH}" >>"$LOGS/env.sh"
  PYTHONPATH=/tmp/rlhf_ops_peers $PY -c "import liger_kernel, cut_cross_entropy; print(\"liger-kernel and cut-cross-entropy importable\")"'

add headline 245 '$PY -m bench.headline --out "$OUT" --budget-s $(( BLOCK_S - 45 )) 2>&1 | tail -40'

add linear_logprobs 40 '
  $PY -m bench.bench_linear_logprobs --size quick --modes fwd,fwd+bwd --out "$LOGS/linear_logprobs.json" 2>&1 | tail -20'

run_blocks
