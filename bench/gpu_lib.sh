# Shared by bench/gpu_check.sh and bench/gpu_bench.sh (source it; not run on its own).
#
# A script is a list of blocks in the order of their value, each with a time budget:
#
#     add NAME BUDGET_S 'shell command'          # one block: adding a check is this one line
#     run_blocks                                 # runs them in order (or prints the plan)
#
# Inside a command: $PY (python3 unless PYTHON is set), $OUT, $LOGS, $BLOCK_S (this block's
# limit in seconds) and the helpers below (pytest_groups, junit_of). Every block runs under
# `timeout` (SIGINT first, so pytest still writes its junit XML), gets at most its budget and
# never more than what is left of TOTAL_S; a block that no longer fits is recorded as "cut".
# After every block: summary.txt is rewritten, the junit XMLs are merged into one junit.xml and
# the logs are re-packed into logs.tgz, so a run killed at its time limit still brings back
# what finished. $OUT (the device tool's result folder) ends with at most 8 files:
#   summary.txt, junit.xml, logs.tgz, and what the blocks write there themselves.
# DRY_RUN=1: the same $OUT layout and the plan (one line per block with its budget and the
# running worst-case sum, then "plan: N s"); nothing runs on a GPU. With COLLECT=1 as well, the
# test blocks are collected here (pytest --collect-only under the interpreter): the counts go
# into summary.txt and collection errors show up before the GPU call.

set -uo pipefail
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-540}
RESERVE_S=${RESERVE_S:-8}            # kept back at the end for the last summary and logs.tgz
MIN_BLOCK_S=${MIN_BLOCK_S:-15}       # a block with less time than this left is cut
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_out}
LOGS=${LOGS:-$(mktemp -d /tmp/rlhf_ops_gpu_logs.XXXXXX)}
DRY_RUN=${DRY_RUN:-0}
SCRIPT_NAME=${SCRIPT_NAME:-$(basename "$0")}
mkdir -p "$OUT" "$LOGS/junit"
export PY OUT LOGS HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET RLHF_OPS_BACKEND
: >"$LOGS/blocks.tsv"
B_NAMES=(); B_BUDGETS=(); B_CMDS=()

add() {  # add NAME BUDGET_S 'command'
  B_NAMES+=("$1"); B_BUDGETS+=("$2"); B_CMDS+=("$3")
}

elapsed() { echo $(( $(date +%s) - T0 )); }

plan_s() {  # worst case: every budget used in full, plus the reserve
  local s=$RESERVE_S b
  for b in "${B_BUDGETS[@]}"; do s=$(( s + b )); done
  echo "$s"
}

# pytest_groups BLOCK "GROUP: test files | pytest options" ...  — one pytest process per group,
# side by side (a CUDA fault or an illegal address in one group cannot poison another, and the
# group's log names the test that was running). Each group writes $LOGS/junit/BLOCK.GROUP.xml
# and $LOGS/BLOCK.GROUP.log; collection errors are counted in the summary. Test files (globs
# allowed) that do not exist yet are dropped; a group left with no file says so.
pytest_groups() {
  local block=$1; shift
  local lim=$(( ${BLOCK_S:-120} - 5 )) spec name files opts f keep pids=() extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout "${TEST_TIMEOUT_S:-90}")
  for spec in "$@"; do
    name=${spec%%:*}; spec=${spec#*:}
    files=${spec%%|*}; opts=""; [[ $spec == *"|"* ]] && opts=${spec#*|}
    keep=()
    for f in $files; do [ -f "$f" ] && keep+=("$f"); done
    if [ ${#keep[@]} -eq 0 ]; then
      echo "group $name: none of [$files] exists in this tree" >"$LOGS/$block.$name.log"
      continue
    fi
    eval "local o=($opts)"
    [ "${DRY_COLLECT:-0}" = 1 ] && extra=(--collect-only -q)
    ( timeout -s INT -k 15 "$lim" $PY -m pytest -v -p no:cacheprovider -o addopts="" -rfE \
        --junitxml="$LOGS/junit/$block.$name.xml" "${extra[@]}" "${o[@]}" "${keep[@]}" \
        >"$LOGS/$block.$name.log" 2>&1
      echo $? >"$LOGS/$block.$name.rc" ) &
    pids+=($!)
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
  local rc=0 r
  for spec in "$@"; do
    name=${spec%%:*}
    r=$(cat "$LOGS/$block.$name.rc" 2>/dev/null || echo 0)
    # 0 passed, 5 nothing selected (e.g. a backend with no test here): not a failure
    [ "$r" = 0 ] || [ "$r" = 5 ] || rc=1
  done
  return $rc
}
export -f pytest_groups

# build_extension: the CUDA extension for this GPU's architecture only, with every core — the
# install-time build (pip -e, RLHF_OPS_BUILD_CUDA=1); should that fail (an old setuptools, say),
# the build on first use (rlhf_ops/build.py) into .jit_cache/, exported to the later blocks
# through $LOGS/env.sh (with rlhf_ops/kernels linked to kernels/ for an uninstalled tree).
build_extension() {
  arch=$($PY -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())") \
    || { echo "no CUDA device: nothing built"; exit 1; }
  echo "install-time build for sm_$arch, $(nproc) jobs"
  RLHF_OPS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) timeout $(( BLOCK_S - 10 )) \
    $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -25
  if $PY -c "import rlhf_ops._C"; then echo "install-time build: ok"
  else
    echo "install-time build failed: the build on first use (rlhf_ops/build.py) instead"
    [ -e rlhf_ops/kernels ] || ln -s ../kernels rlhf_ops/kernels
    printf "export PYTHONPATH=%s TORCH_CUDA_ARCH_LIST=%s RLHF_OPS_CACHE_DIR=%s\n" \
      "$PWD${PYTHONPATH:+:$PYTHONPATH}" "$arch" "$PWD/.jit_cache" >>"$LOGS/env.sh"
    . "$LOGS/env.sh"
    MAX_JOBS=$(nproc) $PY -m rlhf_ops.build --arch "$arch" || exit 1
  fi
  $PY -c "import rlhf_ops as ro; print(\"backends:\", ro.available_backends())"
}
export -f build_extension

# summary.txt, junit.xml and logs.tgz from what ran so far (and what is still planned)
report() {
  $PY - "$LOGS" "$OUT" "$SCRIPT_NAME" "$(elapsed)" "$TOTAL_S" "$DRY_RUN" "${B_NAMES[@]}" <<'PYEOF' || true
import glob, os, re, sys, xml.etree.ElementTree as ET
logs, out, script, elapsed, total, dry = sys.argv[1:7]
names = sys.argv[7:]
rows = {}
for line in open(os.path.join(logs, "blocks.tsv")):
    name, status, took, budget, note = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
    rows[name] = (status, took, budget, note)
# merge every junit XML into one
suites, counts = ET.Element("testsuites"), {}
for path in sorted(glob.glob(os.path.join(logs, "junit", "*.xml"))):
    group = os.path.basename(path)[:-4]
    c = counts.setdefault(group, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []})
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        c["errors"] += 1
        c["failures"].append("junit XML unreadable (the run was killed while writing it)")
        continue
    for s in ([root] if root.tag == "testsuite" else list(root)):
        s.set("name", group)
        suites.append(s)
        for tc in s.iter("testcase"):
            kind = next((ch.tag for ch in tc if ch.tag in ("failure", "error", "skipped")), None)
            tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
            if kind is None:
                c["passed"] += 1
            elif kind == "skipped":
                c["skipped"] += 1
            else:
                c["failed" if kind == "failure" else "errors"] += 1
                msg = (tc.find(kind).get("message") or "").splitlines()
                c["failures"].append(f"{tid}: {msg[0][:160] if msg else kind}")
ET.ElementTree(suites).write(os.path.join(out, "junit.xml"), encoding="unicode")
# collection errors, and the test a crashed group was running (its log's last unfinished line)
collect, crashed = {}, {}
for path in glob.glob(os.path.join(logs, "*.log")):
    text = open(path, errors="replace").read()
    group = os.path.basename(path)[:-4]
    n = len(re.findall(r"^ERROR collecting|^E\s+.*(?:ImportError|ModuleNotFoundError)", text, re.M))
    if "ERROR collecting" in text or "errors during collection" in text:
        collect[group] = max(n, 1)
    # pytest -v prints a test's id before running it and its outcome after: a session without its
    # final "== ... in N s ==" line ended inside the last test it printed
    last = [l for l in text.splitlines() if re.match(r"tests/\S+::", l)]
    if last and not re.search(r"^=+ .* in [\d.]+s", text, re.M):
        crashed[group] = last[-1].split()[0]
lines = [f"{script}: {'DRY RUN (nothing ran)' if dry == '1' else 'GPU check'}; {elapsed} s of TOTAL_S={total} s used",
         f"host info: {open(os.path.join(logs, 'machine.txt')).read().strip() if os.path.exists(os.path.join(logs, 'machine.txt')) else 'n/a'}",
         "", f"{'block':<22} {'status':<10} {'took':>6} {'budget':>6}  details"]
for name in names:
    status, took, budget, note = rows.get(name, ("pending", "", "", "not started (the run ended before it)"))
    groups = {g: c for g, c in counts.items() if g.split(".")[0] == name}
    detail = note
    if groups and dry != "1":
        tot = {k: sum(c[k] for c in groups.values()) for k in ("passed", "failed", "errors", "skipped")}
        detail = (f"{tot['passed']} passed, {tot['failed']} failed, {tot['errors']} errors, "
                  f"{tot['skipped']} skipped" + (f"; {note}" if note else ""))
    lines.append(f"{name:<22} {status:<10} {took:>6} {budget:>6}  {detail}")
    for g, c in sorted(groups.items()):
        ran = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        if dry == "1":
            log = os.path.join(logs, g + ".log")
            m = re.search(r"(\d+)(?:/\d+)? tests? collected", open(log, errors="replace").read()) if os.path.exists(log) else None
            ran = f"collected {m.group(1) if m else 0}"
        rcf = os.path.join(logs, g + ".rc")
        rc = open(rcf).read().strip() if os.path.exists(rcf) else ""
        why = {"0": "", "5": "", "1": "", "2": " (interrupted: collection errors or the time limit)", "124": " (killed at the time limit)",
               "3": " (pytest internal error)", "4": " (usage error)"}.get(rc, f" (exit {rc})")
        lines.append(f"    {g.split('.', 1)[1]:<18} {ran}{why}")
        for f in c["failures"][:12]:
            lines.append(f"        FAIL {f}")
        if len(c["failures"]) > 12:
            lines.append(f"        ... {len(c['failures']) - 12} more (junit.xml)")
    for g, n in sorted(collect.items()):
        if g.split(".")[0] == name:
            lines.append(f"    COLLECTION ERRORS in {g}: {n} (logs.tgz: {g}.log)")
    for g, t in sorted(crashed.items()):
        if g.split(".")[0] == name:
            lines.append(f"    {g}: ended while running {t} (crash or timeout; logs.tgz: {g}.log)")
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
PYEOF
  tar czf "$OUT/logs.tgz.tmp" -C "$LOGS" . 2>/dev/null && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"
}

run_blocks() {
  local i name budget cmd left lim t0 rc status sum=0
  if [ "$DRY_RUN" = 1 ]; then
    echo "== $SCRIPT_NAME plan (DRY_RUN=1; TOTAL_S=$TOTAL_S, each block cut at its budget or at what is left)"
    for i in "${!B_NAMES[@]}"; do
      sum=$(( sum + B_BUDGETS[i] ))
      printf "  %-22s %4s s   worst-case total %4s s\n" "${B_NAMES[i]}" "${B_BUDGETS[i]}" "$sum"
      note=$(printf '%s' "${B_CMDS[i]}" | tr '\n\t' '  ' | tr -s ' ' | cut -c1-120)
      if [ "${COLLECT:-0}" = 1 ] && [[ ${B_CMDS[i]} == *pytest_groups* ]]; then
        # collect the block's tests here (CPU, interpreter): collection errors show before a GPU call
        TRITON_INTERPRET=1 BLOCK_S=300 DRY_COLLECT=1 bash -c "${B_CMDS[i]}" >/dev/null 2>&1
        note="collect-only: $(cat "$LOGS/${B_NAMES[i]}".*.log 2>/dev/null | grep -Eo '[0-9]+(/[0-9]+)? tests? collected' | awk -F'[ /]' '{s += $1} END {print s + 0}') tests selected"
      fi
      printf "%s\tplanned\t\t%s\t%s\n" "${B_NAMES[i]}" "${B_BUDGETS[i]}" "$note" >>"$LOGS/blocks.tsv"
    done
    echo "  (+ ${RESERVE_S} s for the last summary and logs.tgz)"
    report
    echo "plan: $(plan_s) s"
    return 0
  fi
  report
  for i in "${!B_NAMES[@]}"; do
    name=${B_NAMES[i]}; budget=${B_BUDGETS[i]}; cmd=${B_CMDS[i]}
    left=$(( TOTAL_S - RESERVE_S - $(elapsed) ))
    lim=$(( budget < left ? budget : left ))
    if [ "$lim" -lt "$(( budget < MIN_BLOCK_S ? budget : MIN_BLOCK_S ))" ]; then
      printf "%s\tcut\t0\t%s\tnot run: %s s left of TOTAL_S\n" "$name" "$budget" "$left" >>"$LOGS/blocks.tsv"
      echo "== [$(elapsed) s] $name: CUT (only $left s left)"
      report
      continue
    fi
    echo "== [$(elapsed) s] $name (limit $lim s)"
    t0=$(date +%s)
    # env.sh: what a block exports for the later ones (the build's fallback, say)
    BLOCK_S=$lim timeout -s INT -k 20 "$lim" bash -c "set -o pipefail; [ -f \"\$LOGS/env.sh\" ] && . \"\$LOGS/env.sh\"; $cmd" \
      >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|130|137) status=timeout ;;
      *) status=failed ;;
    esac
    printf "%s\t%s\t%s\t%s\t%s\n" "$name" "$status" "$(( $(date +%s) - t0 ))" "$budget" \
      "rc=$rc; $(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | tr '\t' ' ' | cut -c1-160)" >>"$LOGS/blocks.tsv"
    echo "   $status in $(( $(date +%s) - t0 )) s: $(tail -1 "$LOGS/$name.log" | cut -c1-200)"
    report
  done
  echo "== [$(elapsed) s] done; $OUT/summary.txt:"
  cat "$OUT/summary.txt"
}
