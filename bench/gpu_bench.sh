#!/usr/bin/env bash
# The second GPU call: the benchmarks, headline shapes first (bench/headline.py), under TOTAL_S
# (default 470 s; the device tool's call may run 480 s of this script):
#
#   machine          GPU, driver, versions                                              (10 s)
#   build            the CUDA extension for this GPU (as gpu_check.sh)                  (150 s)
#   peers            Liger-Kernel and Cut Cross-Entropy from the wheels carried in
#                    bench/.carry/ (bash bench/fetch_peers.sh here, then carry it)        (15 s)
#   headline         python -m bench.headline: policy head N=8192 H=4096 V=151,936;
#                    attention D=128 causal T=4k/8k/16k; CE and KL at V=32k–262k; against
#                    eager, torch.compile, SDPA/Flex, F.linear_cross_entropy, Liger, CCE;
#                    the cases the budget leaves out are recorded as skipped             (135 s)
#   losses           bench.bench_losses --size quick: the GRPO policy-head step at that
#                    shape (goal ≤ 80 ms, ≤ 6 GiB peak) and gae at B=64, T=8192 (goal
#                    ≥ 100× the per-position loop)                                       (40 s)
#   attention_tree   bench.bench_attention_tree --size quick: tree vs the expanded batch at
#                    P=4096 R=1024 G=8 H=32 D=128, and a Llama-1B-shaped GRPO step with and
#                    without the shared prefix (goals ≥ 2× time, ≥ 2.5× less memory)      (40 s)
#   batch_invariant  bench.bench_batch_invariant --size quick: every op and the aten kernels
#                    with the mode vs without (goals ≤ 15 % policy head, ≤ 20 % attention,
#                    mm within 25 % of cuBLAS)                                            (40 s)
#   linear_logprobs  bench.bench_linear_logprobs --size quick (log-probs + entropy head)   (30 s)
#   context_parallel with ≥ 2 GPUs only (torchrun, NCCL): ring vs gathered K/V vs Ulysses;
#                    added to the plan only there, and cut at what TOTAL_S leaves          (60 s)
#
# Back in $OUT: summary.txt, junit.xml, logs.tgz, <slug>.json and <slug>.md (the headline results,
# the device named: commit them as bench/results/<slug>.*; the README's tables come from them);
# the other blocks' rows are the <block>.json files inside logs.tgz.
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

add headline 135 '$PY -m bench.headline --out "$OUT" --budget-s $(( BLOCK_S - 45 )) 2>&1'

# each writes its rows to $LOGS/<block>.json, and its table to the block's log as it goes (no
# `| tail`: a block cut at its limit keeps what it printed); both come back inside logs.tgz
add losses 40 '
  $PY -m bench.bench_losses --size quick --out "$LOGS/losses.json" 2>&1'

add attention_tree 40 '
  $PY -m bench.bench_attention_tree --size quick --out "$LOGS/attention_tree.json" 2>&1'

add batch_invariant 40 '
  $PY -m bench.bench_batch_invariant --size quick --out "$LOGS/batch_invariant.json" 2>&1'

add linear_logprobs 30 '
  $PY -m bench.bench_linear_logprobs --size quick --modes fwd,fwd+bwd --out "$LOGS/linear_logprobs.json" 2>&1'

# only where there are ≥ 2 GPUs (the lent machine has one): not in a 1-GPU plan
export NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
[ "${NGPU:-0}" -ge 2 ] && add context_parallel 60 '
  $PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU -m bench.bench_context_parallel --gpu \
    --tokens 32768,65536 --out "$LOGS/context_parallel.json" 2>&1'

run_blocks
