"""The benchmark code runs at tiny sizes on every machine, so that it does not rot.

Timings from these runs are never looked at as speed; what is checked is that every bench file,
the memory accounting and the report run, and that what they write is right: the results JSON
follows docs/design.md's format, and the fused ops keep less for backward than eager.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is not installed; it lives beside tests/ in the repository
    sys.path.insert(0, ROOT)

from bench import harness, memory, report  # noqa: E402


def test_bench_files_smoke():
    """Each bench_<op>.py runs its smoke cases (reference backend, every mode) under pytest."""
    files = [f"bench/bench_{f}.py" for f in harness.FAMILIES]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--benchmark-disable", "--bench-size", "smoke", *files],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    n = sum(len(harness.cases(f, "smoke")) for f in harness.FAMILIES) * len(harness.MODES)
    n += 2  # bench_attention.py's packed-varlen smoke case, fwd and fwd+bwd
    assert f"{n} passed" in p.stdout, p.stdout[-2000:]
    assert "skipped" not in p.stdout.splitlines()[-1]


@pytest.fixture(scope="module")
def memory_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mem")
    memory.main(["--out", str(out)])
    with open(out / "memory.json") as f:
        res = json.load(f)
    assert (out / "memory.md").read_text().count("\n") >= len(res["rows"]) + 2
    return res


def _rows(res, op):
    return {r["backend"]: r for r in res["rows"] if r["op"] == op}


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy", "token_logprobs", "kl_penalty"])
def test_memory_vocab_ops(memory_result, op):
    """Eager keeps an fp32 [N, V] log-softmax; the fused op keeps O(N) (nothing of size V)."""
    rows = _rows(memory_result, op)
    eager = rows["reference"]
    assert eager["status"] == "ok", eager
    shape = eager["shape"]
    n = shape.get("N") or shape["B"] * shape["T"]
    V = shape["V"]
    assert eager["saved_bytes"] >= 4 * n * V
    fused = rows["triton"]
    assert fused["status"] == "ok", fused
    assert fused["saved_bytes"] < eager["saved_bytes"]
    assert fused["saved_bytes"] <= 64 * n, fused  # a few fp32/int64 numbers per token
    assert fused["vs_eager"] == pytest.approx(fused["saved_bytes"] / eager["saved_bytes"])


def test_memory_attention_and_reward(memory_result):
    """Where the fused op has landed: attention keeps O(B·H·T) (out + lse), not O(B·H·T²);
    the reward loss keeps no [B, K, K] tensor."""
    att = _rows(memory_result, "attention")
    s = att["reference"]["shape"]
    bht = s["B"] * s["H"] * s["T"]
    assert att["reference"]["saved_bytes"] >= 2 * bht * s["T"]  # the bf16 [T, S] probabilities
    rew = _rows(memory_result, "pairwise_reward_loss")
    B, K = rew["reference"]["shape"]["B"], rew["reference"]["shape"]["K"]
    for rows, bound in ((att, bht * (2 * s["D"] + 8) + 4096), (rew, B * K * 8 + 4096)):
        for b in ("triton", "cuda"):
            r = rows[b]
            assert r["status"] in ("ok", "missing", "failed")
            if r["status"] == "ok":
                assert r["saved_bytes"] <= bound, r
            else:
                assert r["reason"]


def test_memory_counts_tensors_kept_outside_autograd():
    """A gradient precomputed in the forward and kept on ctx (not saved) is still counted."""
    class KeepsGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.grad = torch.empty(x.shape, device=x.device, dtype=torch.float32)
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            return ctx.grad * g

    r = memory.saved_for_backward(lambda a: KeepsGrad.apply(a[0]), lambda: [memory._m(300, 500, grad=True)])
    assert r["kept_elsewhere_bytes"] == 300 * 500 * 4 and r["saved_tensor_bytes"] == 0
    r = memory.saved_for_backward(lambda a: a[0].float().exp().sum(), lambda: [memory._m(300, 500, grad=True)])
    assert r["saved_tensor_bytes"] == 300 * 500 * 4 and r["kept_elsewhere_bytes"] == 0
    r = memory.saved_for_backward(lambda a: (a[0] * a[0]).sum(), lambda: [memory._m(300, 500, grad=True)])
    assert r["saved_bytes"] == 0 and r["saved_bytes_incl_inputs"] == 300 * 500 * 2


def test_report_smoke(tmp_path):
    """bench.report at smoke size writes a results JSON in docs/design.md's format, a table, plots."""
    res = report.main(["--size", "smoke", "--out", str(tmp_path)])
    slug = report.device_slug(res["device"])
    with open(tmp_path / f"{slug}.json") as f:
        saved = json.load(f)
    report.validate(saved)
    assert saved["commit"] and saved["roofline"]["hbm_gbps"] > 0 and saved["roofline"]["bf16_tflops"] > 0
    assert saved["smoke"] is True and "NOT speed" in (tmp_path / f"{slug}.md").read_text()
    got = {(e["op"], e["mode"]) for e in saved["benchmarks"] if e["backend"] == "reference"
           and e["status"] == "ok"}
    ops = {c.op for f in harness.FAMILIES for c in harness.cases(f, "smoke")}
    assert got == {(op, m) for op in ops for m in harness.MODES}
    for e in saved["benchmarks"]:
        if e["status"] == "ok":
            assert e["median_ms"] > 0 and e["bytes"] > 0 and e["flop"] > 0
            assert e["gbps"] == pytest.approx(e["bytes"] / (e["median_ms"] * 1e-3) / 1e9)
            assert e["baselines"]["eager"]["median_ms"] > 0
        else:
            assert e["reason"]
    # the one tiny Triton case ran under the interpreter (or says why not)
    tri = [e for e in saved["benchmarks"] if e["backend"] == "triton" and e["status"] != "skipped"]
    assert tri and all(e["status"] == "ok" or e["reason"] for e in tri)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{slug}-{op}.png" for op in ops)


def test_validate_rejects_bad_results():
    good = {"device": "x", "commit": "abc", "date": "2026-01-02", "torch": "2", "triton": "3",
            "roofline": {"hbm_gbps": 1.0, "bf16_tflops": 1.0}, "tests": {"attention/triton":
            {"passed": 1, "failed": 0, "skipped": 0}}, "benchmarks": [
            {"op": "attention", "backend": "triton", "mode": "fwd", "shape": {}, "dtype": "bf16",
             "median_ms": 1.5, "tflops": 1.0, "gbps": 1.0, "roofline_frac": 0.5,
             "peak_mem_bytes": 0, "baselines": {"eager": {"median_ms": 3.0}}}]}
    report.validate(good)
    for mutate in (lambda r: r.pop("roofline"), lambda r: r["benchmarks"][0].pop("baselines"),
                   lambda r: r["benchmarks"][0].update(mode="forward"),
                   lambda r: r["benchmarks"][0].update(median_ms=0.0),
                   lambda r: r["tests"].update(bad={"passed": 1, "failed": 0, "skipped": 0}),
                   lambda r: r["benchmarks"][0].update(status="failed", reason="")):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError):
            report.validate(bad)


def test_device_slug_and_junit(tmp_path):
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert report.device_slug("NVIDIA H100 PCIe") == "h100-pcie"
    assert report.device_slug("NVIDIA H200") == "h200"
    assert report.device_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm"
    assert report.device_slug("CPU") == "cpu"
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_attention" name="test_fwd[triton-17]"/>'
        '<testcase classname="tests.test_attention" name="test_fwd[cuda-17]"><skipped/></testcase>'
        '<testcase classname="tests.test_attention" name="test_bad_inputs"/>'
        '<testcase classname="tests.test_kl" name="test_k[reference-k1]"><failure/></testcase>'
        '</testsuite></testsuites>')
    assert report.parse_junit(str(xml)) == {
        "attention/all": {"passed": 1, "failed": 0, "skipped": 0},
        "attention/cuda": {"passed": 0, "failed": 0, "skipped": 1},
        "attention/triton": {"passed": 1, "failed": 0, "skipped": 0},
        "kl/reference": {"passed": 0, "failed": 1, "skipped": 0}}


def test_flop_and_byte_counts():
    """The standard counts the results are judged by."""
    c = harness._attn_case(2, 4, 64, 16, True, torch.float16, "smoke")
    fwd = 4 * 2 * 4 * 64 * 64 * 16 // 2
    assert c.flop == {"fwd": fwd, "bwd": int(2.5 * fwd), "fwd+bwd": int(3.5 * fwd)}
    assert harness._attn_case(2, 4, 64, 16, False, torch.float16, "smoke").flop["fwd"] == 2 * fwd
    ce = harness._ce_case(8192, 128256, torch.bfloat16, "smoke")
    nv2 = 8192 * 128256 * 2
    assert ce.bytes["fwd"] == nv2 + 20 * 8192 and ce.bytes["fwd+bwd"] == 3 * nv2 + 40 * 8192
    r = harness.rates(ce, "fwd", 2.0, {"hbm_gbps": 1000.0, "bf16_tflops": 900.0})
    assert r["gbps"] == pytest.approx(ce.bytes["fwd"] / 2e-3 / 1e9)
    assert r["roofline_frac"] == pytest.approx(r["gbps"] / 1000.0)
    assert harness.rates(c, "fwd", 1.0, {"hbm_gbps": 1.0, "bf16_tflops": 2.0})["roofline_frac"] == \
        pytest.approx(fwd / 1e-3 / 1e12 / 2.0)


def test_goals_table():
    """The issues' performance goals are read off the goal-shape entries, per fused backend."""
    e = {"op": "cross_entropy", "backend": "triton", "mode": "fwd+bwd", "shape": {"N": 8192, "V": 128256},
         "dtype": "bf16", "status": "ok", "median_ms": 1.0, "tflops": 1.0, "gbps": 1.0,
         "roofline_frac": 0.85, "peak_mem_bytes": 0,
         "baselines": {"eager": {"median_ms": 2.5, "speedup": 2.5}, "compile": {"median_ms": 0.9, "speedup": 0.9},
                       "liger": {"status": "missing", "reason": "not installed"}}}
    got = {(g["goal"], g["backend"]): g for g in report.goals([e]) if g["op"] == "cross_entropy"}
    assert got[("≥ 2× eager", "triton")]["met"] is True
    assert got[("≥ torch.compile", "triton")]["met"] is False
    assert got[("≥ Liger", "triton")]["met"] is None
    assert got[("≥ 80% of copy GB/s", "triton")]["value"] == 0.85
    assert got[("≥ 2× eager", "cuda")]["met"] is None
    res = {"device": "NVIDIA H100 80GB HBM3", "commit": "0" * 40, "date": "2026-01-01", "torch": "2",
           "triton": "3", "roofline": {"hbm_gbps": 3000.0, "bf16_tflops": 700.0}, "tests": {},
           "benchmarks": [e], "goals": report.goals([e])}
    md = report.markdown(res)
    assert "| #2 | cross_entropy | fwd+bwd | triton | ≥ torch.compile | 0.90 | **no** |" in md
