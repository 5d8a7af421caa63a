#!/usr/bin/env bash
# The first call on a freshly started GPU machine (the device image: python3 with torch, Triton,
# transformers, pytest, pytest-xdist/-timeout, compute-sanitizer, nvcc; no network, no TRL).
# Blocks in the order of their value, each cut at its budget, the whole under TOTAL_S (540 s):
#
#   machine          GPU, driver, versions                                            (10 s)
#   build            the CUDA extension for this GPU's arch only, all cores; install-time
#                    build (pip -e), and the build on first use if that fails          (180 s)
#   validate         python -m rlhf_ops.validate --quick --device cuda (every op, attention_tree
#                    and gae included; its table and JSON come back as validate.txt / .json) (45 s)
#   cuda_tests       the never-executed CUDA kernels: the cuda-backend tests (CE and log-probs
#                    with softcap and the head's stats, reward, attention, gae, the batch-
#                    invariant ops), one pytest process per kernel group, side by side   (80 s)
#   cuda_sanitize    memcheck, racecheck, initcheck, synccheck side by side over every
#                    CUDA kernel (bench/sanitize_cuda.py, gae included), ours only       (50 s)
#   triton_tests     the Triton CE / log-probs / KL / reward / losses kernels, the batch-
#                    invariant mode and its aten kernels, context-parallel attention (4
#                    processes sharing the GPU, gloo)                                    (70 s)
#   triton_attention the Triton attention kernels, dense, varlen and tree (the autotuner
#                    compiles here)                                                      (60 s)
#   train_tiny       python -m rlhf_ops.train all --preset tiny on the GPU              (30 s)
#
# The benchmarks are the second call's (bench/gpu_bench.sh).
#
# Back in $OUT (≤ 8 files): summary.txt (rewritten after every block: what ran, passed, failed,
# was cut), junit.xml (every pytest group merged), logs.tgz (every log, re-packed after every
# block), validate.txt, validate.json.
#
#   OUT=/some/dir bash bench/gpu_check.sh          # from the repository root
#   DRY_RUN=1 bash bench/gpu_check.sh              # the plan and the $OUT layout; nothing runs
#   PYTHON=python TOTAL_S=400 bash bench/gpu_check.sh
#
# Adding a check is one line below: `add NAME BUDGET_S 'command'` (for tests,
# `pytest_groups NAME "group: files | pytest options" ...`), budgets so that `plan:` stays ≤ 540.
# See bench/gpu_lib.sh and bench/README.md.
cd "$(dirname "$0")/.."
SCRIPT_NAME=gpu_check.sh
. bench/gpu_lib.sh

# ---- the blocks, most valuable first -----------------------------------------------------------
add machine 10 '
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1
    $PY -c "import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")"
    echo "commit ${COMMIT:-unknown}, $(nproc) cores"; } | tee "$LOGS/machine.txt"'

add build 180 'build_extension'

add validate 45 '
  [ -f rlhf_ops/validate.py ] || { echo "rlhf_ops/validate.py is not in this tree: not run"; exit 0; }
  $PY -m rlhf_ops.validate --quick --device cuda --json "$OUT/validate.json" | tee "$OUT/validate.txt"'

# test files that do not exist yet (tests/test_softcap_heads.py, tests/test_batch_invariant_ops.py)
# are dropped by pytest_groups; a group left with none says so in its log
add cuda_tests 80 'pytest_groups cuda_tests \
  "ce: tests/test_cross_entropy.py tests/test_softcap_heads.py | -k cuda" \
  "logprobs: tests/test_kl.py tests/test_kl_oracle.py tests/test_linear_logprobs.py tests/test_linear_logprobs_stats.py | -k cuda" \
  "reward: tests/test_reward.py | -k cuda" \
  "attention: tests/test_attention_cuda.py tests/test_attention.py tests/test_attention_varlen.py tests/test_attention_tree.py | -k cuda" \
  "losses: tests/test_losses.py | -k cuda" \
  "batch_invariant: tests/test_batch_invariant_ops.py | -k cuda" \
  "api: tests/test_extension.py tests/test_opcheck.py tests/test_bad_input.py tests/test_autocast_compile.py tests/test_build.py | -k \"cuda and not jit_build\""'

add cuda_sanitize 50 '
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [ -n "$SAN" ] || { echo "compute-sanitizer not found: NOT run"; exit 1; }
  $PY bench/sanitize_cuda.py >"$LOGS/sanitize_plain.log" 2>&1 || { tail -5 "$LOGS/sanitize_plain.log"; exit 1; }
  filt=(); "$SAN" --help 2>/dev/null | grep -q -- --kernel-name && filt=(--kernel-name kns=rlhf)
  for tool in memcheck racecheck initcheck synccheck; do
    ( PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 $(( BLOCK_S - 10 )) "$SAN" --tool $tool "${filt[@]}" \
        --error-exitcode 7 $PY bench/sanitize_cuda.py >"$LOGS/sanitize_$tool.log" 2>&1
      echo $? >"$LOGS/sanitize_$tool.rc" ) &
  done
  wait; bad=0
  for tool in memcheck racecheck initcheck synccheck; do
    rc=$(cat "$LOGS/sanitize_$tool.rc")
    case $rc in 0) v=clean ;; 7) v="ERRORS FOUND"; bad=1 ;; 124|137) v="timed out, not checked to the end"; bad=1 ;;
                *) v="failed to run (rc=$rc)"; bad=1 ;; esac
    echo "$tool: $v ($(grep -c ": ok" "$LOGS/sanitize_$tool.log") cases done)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Uninitialized" "$LOGS/sanitize_$tool.log" | head -3
  done
  exit $bad'

# context_parallel: one spawn of 4 processes on the one GPU (gloo takes CPU copies); its deadline
# ends before the group is cut, so a hang reports each rank's tail. The spill audit and the bench
# smoke of the batch-invariant file compile / run on the CPU in CI: not repeated here.
add triton_tests 70 'export RLHF_CP_DEADLINE_S=$(( BLOCK_S - 20 )); pytest_groups triton_tests \
  "ce: tests/test_cross_entropy.py tests/test_softcap_heads.py | -k triton" \
  "logprobs: tests/test_kl.py tests/test_linear_logprobs.py tests/test_linear_logprobs_stats.py | -k triton" \
  "reward: tests/test_reward.py | -k triton" \
  "losses: tests/test_losses.py | -k \"triton or composes\"" \
  "batch_invariant: tests/test_batch_invariant.py tests/test_batch_invariant_ops.py | -k \"not without_spills and not bench_smoke\"" \
  "context_parallel: tests/test_context_parallel.py | -k \"not training_loop\""'

add triton_attention 60 'pytest_groups triton_attention \
  "dense: tests/test_attention.py | -k triton" \
  "varlen: tests/test_attention_varlen.py | -k triton" \
  "edges: tests/test_attention_edges.py" \
  "tree: tests/test_attention_tree.py | -k triton"'

add train_tiny 30 '
  $PY -m rlhf_ops.train all --preset tiny --device cuda --out "$LOGS/train_tiny" --set run.progress=false \
    >"$LOGS/train_tiny.out" 2>&1; rc=$?; tail -4 "$LOGS/train_tiny.out"; exit $rc'

run_blocks
