"""Micro-benchmarks of linear_token_logprobs with the entropy: per-token log-probs and
entropy straight from hidden states [N, d] and an LM head [V, d], against
  eager    log_softmax(F.linear(h, W).float()).gather + entropy (the reference backend),
  compile  torch.compile of it,
  trl      TRL's fused LM head kernel (trl.kernels.ChunkedLogProbFunction, log-probs + entropy),
  liger    Liger-Kernel's fused linear GRPO loss (LigerFusedLinearGRPOLoss, β = 0: a loss, not
           per-token outputs, but the op a GRPO trainer on Liger runs in this place),
and our triton / cuda backends; modes fwd, bwd and fwd+bwd; time and peak memory (CUDA).
The goal shape is 8 × 1,024 tokens × V = 128,256 × d = 4,096 in bf16; the issue's goal on a GPU:
peak memory ≤ (hidden + weight) · 1.1 and time ≤ compile. The table's ``extra/(h+W)`` is the
memory an op adds on top of its resident inputs (harness.measure's peak) over hidden + weight:
the forward goal is ≤ 0.10 (fwd+bwd adds the gradients themselves, d W alone 1.0).

    pytest bench/bench_linear_logprobs.py --benchmark-enable [--bench-size smoke|quick|llm]
    python -m bench.bench_linear_logprobs [--size smoke|quick|llm] [--modes fwd,fwd+bwd]
                                          [--impls a,b] [--out results.json]

Peers are imported only here, inside their implementation, and reported ``missing`` when they
are not installed. A CPU smoke run times only the eager reference (as the other bench files).
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

import rlhf_ops as ro

from bench import harness

OP = "linear_token_logprobs"


def _eager(inp, backend):
    h, w, t = inp["args"]
    return ro.linear_token_logprobs(h, w, t, return_entropy=True, backend=backend)


def _trl(inp):
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as e:
        raise harness.Missing(f"trl's fused LM head is not installed ({e})") from None
    h, w, t = inp["args"]
    if h.device.type != "cuda":
        raise harness.Missing("trl's fused LM head kernel is timed on CUDA only")
    lp, ent = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, None, 1.0, ("entropy",))[:2]
    return lp, ent


def _liger(inp):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise harness.Missing(f"liger-kernel is not installed ({e})") from None
    h, w, t = inp["args"]
    B = 8 if h.shape[0] % 8 == 0 else 1
    T = h.shape[0] // B
    loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)(
        h.view(B, T, -1), w, t.view(B, T), torch.ones(B, T, device=h.device, dtype=torch.long),
        torch.zeros(B, device=h.device, dtype=torch.float32))
    return loss[0] if isinstance(loss, tuple) else loss


def _diff(out):
    if isinstance(out, tuple):
        return [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
    return [out]


def case(N: int, d: int, V: int, dtype: torch.dtype, size: str, priority=False) -> harness.Case:
    e = torch.tensor([], dtype=dtype).element_size()
    io = (N * d + V * d) * e
    c = harness.Case(
        op=OP, family="linear_logprobs", shape={"N": N, "d": d, "V": V}, dtype=dtype, x=V,
        series=f"N={N},d={d}",
        make=lambda dev: {"device": torch.device(dev), "args": [
            (torch.randn(N, d, device=dev, dtype=dtype) / math.sqrt(d)).requires_grad_(),
            (torch.randn(V, d, device=dev, dtype=dtype) / math.sqrt(d)).requires_grad_(),
            torch.randint(0, V, (N,), device=dev)], "kw": {}},
        diff=_diff,
        # matmul FLOPs: forward 2·N·d·V, backward 4·N·d·V (d hidden and d W); the fused
        # backends recompute the logits in backward (2·N·d·V more), not counted as useful work.
        flop={"fwd": 2 * N * d * V, "bwd": 4 * N * d * V, "fwd+bwd": 6 * N * d * V},
        bytes={"fwd": io + 24 * N, "bwd": 2 * io + 24 * N, "fwd+bwd": 3 * io + 48 * N},
        bound="compute", priority=priority)
    for b in harness.OUR_BACKENDS:
        c.impls["eager" if b == "reference" else b] = harness._ours(OP, b, _eager)
    if size != "smoke":
        c.impls["compile"] = harness._compiled(_eager)
        c.impls["trl"] = _trl
        c.impls["liger"] = _liger
    return c


def cases(size: str) -> list[harness.Case]:
    if size == "smoke":
        return [case(32, 64, 500, torch.float32, size)]
    out = [case(8192, 4096, 128256, torch.bfloat16, size, True)]
    if size == "llm":
        out += [case(8192, 4096, 32000, torch.bfloat16, size), case(2048, 4096, 128256, torch.bfloat16, size)]
    return out


# --------------------------------------------------------------------------- pytest entry ---

def _default_size():
    return "llm" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "smoke"


def pytest_generate_tests(metafunc):
    if "lcase" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    size = cfg.getoption("--bench-size", None) or _default_size()
    modes = (cfg.getoption("--bench-modes", None) or ",".join(harness.MODES)).split(",")
    # CPU smoke: the other implementations need a GPU
    harness.parametrize(metafunc, ("lcase", "impl", "mode"), cases(size), lambda c: modes,
                        keep=lambda name: size != "smoke" or name == "eager")


def test_linear_token_logprobs(benchmark, lcase, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, lcase, impl, mode, device)


# ---------------------------------------------------------------------------- table entry ---

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default=None, choices=harness.SIZES)
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--impls", default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    size = a.size or _default_size()
    dev = torch.device("cuda" if size != "smoke" and torch.cuda.is_available() else "cpu")
    rows = []
    print(f"{'shape':<28} {'impl':<8} {'mode':<8} {'ms':>9} {'peak MiB':>9} {'extra/(h+W)':>11}  note")
    for c in cases(size):
        e = torch.tensor([], dtype=c.dtype).element_size()
        resident = (c.shape["N"] + c.shape["V"]) * c.shape["d"] * e
        for name in c.impls:
            if a.impls and name not in a.impls.split(","):
                continue
            if dev.type == "cpu" and name != "eager":
                continue
            for mode in a.modes.split(","):
                r = harness.measure(c, name, mode, dev, target_s=0.1 if dev.type == "cpu" else 0.25)
                peak = r.get("peak_mem_bytes")
                rows.append({"op": OP, "impl": name, "mode": mode, "shape": c.shape,
                             "dtype": harness.DTYPE_NAMES[c.dtype], **r})
                shape = ",".join(f"{k}{v}" for k, v in c.shape.items())
                if r["status"] == "ok":
                    ratio = "" if peak is None else f"{peak / resident:11.3f}"
                    mib = "" if peak is None else f"{peak / 2**20:9.1f}"
                    print(f"{shape:<28} {name:<8} {mode:<8} {r['median_ms']:9.3f} {mib:>9} {ratio:>11}")
                else:
                    print(f"{shape:<28} {name:<8} {mode:<8} {r['status']:>9}  {r['reason'][:90]}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    harness.write_rows(a.out, dev, rows)


if __name__ == "__main__":
    main()
