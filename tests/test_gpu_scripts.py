"""bench/gpu_check.sh and bench/gpu_bench.sh, as far as a CPU machine can run them.

* DRY_RUN=1: the plan fits the device tool's limits (≤ 540 s for the first call, ≤ 480 s for the
  second), ends with "plan: N s", keeps the blocks' order of value, and $OUT gets the layout a
  real run returns (≤ 8 files).
* bench/gpu_lib.sh's mechanics on stand-in blocks: a block that passes, one that fails, one that
  runs past its budget (cut by timeout), one that no longer fits TOTAL_S (recorded as cut), and a
  pytest group with a failing test and one with a collection error: summary.txt says each,
  junit.xml holds the tests, logs.tgz the logs — rewritten after every block.
"""
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs bash")


def _run(args, env, cwd=ROOT, timeout=120):
    return subprocess.run(args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script,limit", [("gpu_check.sh", 540), ("gpu_bench.sh", 480)])
def test_dry_run_plan_fits(tmp_path, script, limit):
    p = _run(["bash", f"bench/{script}"], {"DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"plan: (\d+) s", last)
    assert m and int(m.group(1)) <= limit, last
    files = sorted(os.listdir(tmp_path))
    assert files == ["junit.xml", "logs.tgz", "summary.txt"], files
    summary = (tmp_path / "summary.txt").read_text()
    blocks = re.findall(r"^  (\w+)\s+\d+ s", p.stdout, re.M)
    assert blocks and all(re.search(rf"^{b}\s+planned", summary, re.M) for b in blocks), summary
    if script == "gpu_check.sh":   # the order of value the first call must keep
        assert blocks[:5] == ["machine", "build", "validate", "cuda_tests", "cuda_sanitize"], blocks
    else:                          # the headline shapes before the other benchmarks
        assert blocks[:4] == ["machine", "build", "peers", "headline"], blocks


def test_blocks_report_ok_failed_timeout_cut_and_tests(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    (tests / "test_b.py").write_text("import no_such_module_here\n\ndef test_x():\n    pass\n")
    script = tmp_path / "blocks.sh"
    script.write_text(f"""
cd {tmp_path}
SCRIPT_NAME=stand-in
. {ROOT}/bench/gpu_lib.sh
add good 10 'echo fine'
add bad 10 'echo broken; exit 3'
add slow 3 'sleep 30'
add tests 40 'pytest_groups tests "a: tests/test_a.py" "b: tests/test_b.py" "gone: tests/test_nothere.py"'
add wait 12 'sleep 7'
add late 60 'echo never'   # over 11 s used, 8 s kept back: under 10 s left of 26, cut
run_blocks
""")
    out = tmp_path / "out"
    p = _run(["bash", str(script)], {"OUT": str(out), "PYTHON": sys.executable, "TOTAL_S": "26",
                                     "MIN_BLOCK_S": "10"}, cwd=tmp_path, timeout=200)
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^good\s+ok\b", summary, re.M), summary
    assert re.search(r"^bad\s+failed\b.*rc=3", summary, re.M), summary
    assert re.search(r"^slow\s+timeout\b", summary, re.M), summary
    assert re.search(r"^tests\s+failed\b.*1 passed, 1 failed, 1 errors", summary, re.M), summary
    assert "FAIL tests.test_a::test_bad" in summary
    assert "COLLECTION ERRORS in tests.b" in summary
    assert re.search(r"^late\s+cut\b", summary, re.M), summary
    names = {tc.get("name") for tc in ET.parse(out / "junit.xml").getroot().iter("testcase")}
    assert {"test_ok", "test_bad"} <= names
    with tarfile.open(out / "logs.tgz") as t:
        logs = {os.path.basename(n) for n in t.getnames()}
    assert {"good.log", "bad.log", "tests.a.log", "tests.b.log", "tests.gone.log", "blocks.tsv"} <= logs
    assert sorted(os.listdir(out)) == ["junit.xml", "logs.tgz", "summary.txt"]
