"""Micro-benchmarks of the policy losses and GAE (rlhf_ops/losses.py).

1. The policy-head step of GRPO, forward + backward, from the last hidden states h [N, H] and the
   LM head W [V, H] to d h and d W: per-token log-probs and entropy, then ``policy_loss``
   (loss_type="grpo", k3 KL to reference log-probs with β = 0.04, entropy bonus 0.01), against
     eager    logits = h @ Wᵀ (bf16) → log_softmax in fp32 → gather (selective log-softmax) →
              entropy → policy_loss (what TRL's GRPOTrainer runs);
     compile  torch.compile of eager;
     torch_linear_ce  −F.linear_cross_entropy(h, W, tokens, reduction="none") as the log-probs
              (PyTorch's chunked fused head; it has no entropy, so the entropy term is left out);
     liger    Liger-Kernel's LigerFusedLinearGRPOLoss (β = 0, no reference model: its fused head
              and GRPO loss in one op) when installed;
   and our triton / cuda backends (linear_token_logprobs + policy_loss). The goal shape is
   N = 8,192 tokens (16 sequences × 512), H = 4,096, V = 151,936 in bf16; the issue's GPU goals:
   ≤ 80 ms and ≤ 6 GiB peak on an H100 (Liger 192 ms / 6.1 GiB, eager 59 ms / 19.9 GiB).
   FLOP: forward 2·N·H·V, backward 4·N·H·V (d h and d W; the fused backends recompute the
   logits, not counted); the loss itself is O(N). Bytes: 3·(N·H + V·H)·e + 64·N.
2. ``gae`` over B = 64 sequences of T = 8,192 (fp32, a multi-run mask) on triton / cuda against
   the per-position loop (the reference backend: T iterations of ~10 launches each). Goal: ≥ 100×
   the loop. FLOP 6·B·T; bytes 17·B·T (rewards, values read, advantages, returns written in fp32;
   a uint8 mask read).

    pytest bench/bench_losses.py --benchmark-enable [--bench-size smoke|quick|llm]
    python -m bench.bench_losses [--size smoke|quick] [--impls a,b] [--out results.json]

On a CPU (smoke) only the eager/reference implementations run, at tiny sizes: a check that the
code runs, never a speed. Peers are imported only inside their implementation and reported
``missing`` when not installed.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

import rlhf_ops as ro

from bench import harness

BETA, ENT_COEF = 0.04, 0.01


# ------------------------------------------------------------------------ policy-head step ---

def _loss(lp, ent, inp):
    """GRPO's policy_loss on [G, T] log-probs (entropy may be None)."""
    old, ref, adv, mask = inp["kw"]["old"], inp["kw"]["ref"], inp["kw"]["adv"], inp["kw"]["mask"]
    G, T = old.shape
    kw = dict(entropy=ent.view(G, T), entropy_coef=ENT_COEF) if ent is not None else {}
    return ro.policy_loss(lp.view(G, T), old, adv, mask, loss_type="grpo", ref_logprobs=ref, beta=BETA, **kw).loss


def _fused(inp, backend):
    h, w, t = inp["args"]
    lp, ent = ro.linear_token_logprobs(h, w, t, return_entropy=True, backend=backend)
    return _loss(lp, ent, inp)


def _eager(inp, backend="reference"):
    h, w, t = inp["args"]
    logits = F.linear(h, w)                                  # [N, V] in the input dtype
    logp_all = torch.log_softmax(logits.float(), -1)
    lp = logp_all.gather(-1, t[:, None]).squeeze(-1)         # selective log-softmax
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return _loss(lp, ent, inp)


def _torch_linear_ce(inp):
    if not hasattr(F, "linear_cross_entropy"):
        raise harness.Missing(f"torch {torch.__version__} has no F.linear_cross_entropy")
    h, w, t = inp["args"]
    opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    lp = -F.linear_cross_entropy(h, w, t, reduction="none", **({"options": opts()} if opts else {}))
    return _loss(lp.float(), None, inp)


def _liger(inp):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise harness.Missing(f"liger-kernel is not installed ({e})") from None
    h, w, t = inp["args"]
    G, T = inp["kw"]["old"].shape
    out = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)(
        h.view(G, T, -1), w, t.view(G, T), inp["kw"]["mask"].long(), inp["kw"]["adv"])
    return out[0] if isinstance(out, tuple) else out


def policy_case(G: int, T: int, H: int, V: int, dtype: torch.dtype, size: str, priority=False) -> harness.Case:
    N = G * T
    e = torch.tensor([], dtype=dtype).element_size()
    io = (N * H + V * H) * e

    def make(dev):
        dev = torch.device(dev)
        mask = torch.ones(G, T, dtype=torch.bool, device=dev)
        mask[:, T - T // 8:] = torch.rand(G, T // 8, device=dev) > 0.5      # some padding at the end
        lp0 = -3 * torch.rand(G, T, device=dev)
        return {"device": dev,
                "args": [(torch.randn(N, H, device=dev, dtype=dtype) / math.sqrt(H)).requires_grad_(),
                         (torch.randn(V, H, device=dev, dtype=dtype) / math.sqrt(H)).requires_grad_(),
                         torch.randint(0, V, (N,), device=dev)],
                "kw": {"old": lp0 + 0.1 * torch.randn(G, T, device=dev), "ref": lp0 + 0.1 * torch.randn(G, T, device=dev),
                       "adv": torch.randn(G, device=dev), "mask": mask}}

    c = harness.Case(
        op="policy_head_step", family="losses", shape={"N": N, "H": H, "V": V}, dtype=dtype, x=V,
        series=f"N={N},H={H}", make=make, diff=lambda out: [out],
        flop={"fwd": 2 * N * H * V, "bwd": 4 * N * H * V, "fwd+bwd": 6 * N * H * V},
        bytes={"fwd": io + 32 * N, "bwd": 2 * io + 32 * N, "fwd+bwd": 3 * io + 64 * N},
        bound="compute", priority=priority)
    c.impls["eager"] = _eager
    for b in ("triton", "cuda"):
        c.impls[b] = harness._ours("linear_token_logprobs", b, _fused)
    if size != "smoke":
        c.impls["compile"] = harness._compiled(_eager)
        c.impls["torch_linear_ce"] = _torch_linear_ce
        c.impls["liger"] = _liger
    return c


# ------------------------------------------------------------------------------------ gae ---

def gae_case(B: int, T: int, size: str, priority=False) -> harness.Case:
    def make(dev):
        dev = torch.device(dev)
        m = torch.rand(B, T, device=dev) > 0.1          # several runs per sequence (tool tokens masked)
        return {"device": dev, "args": [torch.randn(B, T, device=dev), torch.randn(B, T, device=dev), m],
                "kw": {}}

    def call(inp, backend):
        return ro.gae(*inp["args"], gamma=1.0, lam=0.95, backend=backend)

    c = harness.Case(
        op="gae", family="losses", shape={"B": B, "T": T}, dtype=torch.float32, x=T, series=f"B={B}",
        make=make, diff=lambda out: [], flop={m: 6 * B * T for m in harness.MODES},
        bytes={m: 17 * B * T for m in harness.MODES}, bound="memory", priority=priority)
    c.impls["loop"] = lambda inp: call(inp, "reference")
    for b in ("triton", "cuda"):
        c.impls[b] = harness._ours("gae", b, call)
    return c


def cases(size: str) -> list[harness.Case]:
    if size == "smoke":
        return [policy_case(2, 8, 32, 300, torch.float32, size), gae_case(3, 40, size)]
    return [policy_case(16, 512, 4096, 151936, torch.bfloat16, size, True), gae_case(64, 8192, size, True)]


def modes(case: harness.Case) -> tuple[str, ...]:
    return ("fwd+bwd",) if case.op == "policy_head_step" else ("fwd",)   # gae has no gradient


# --------------------------------------------------------------------------- pytest entry ---

def _default_size():
    return "quick" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "smoke"


BASELINES = ("eager", "loop")   # what the CPU smoke runs


def pytest_generate_tests(metafunc):
    if "loss_case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size", None) or _default_size()
    size = "quick" if size == "llm" else size
    harness.parametrize(metafunc, ("loss_case", "impl", "mode"), cases(size), modes,
                        keep=lambda name: size != "smoke" or name in BASELINES)


def test_losses(benchmark, loss_case, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, loss_case, impl, mode, device)


# ---------------------------------------------------------------------------- table entry ---

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default=None, choices=("smoke", "quick"))
    ap.add_argument("--impls", default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    size = a.size or _default_size()
    dev = torch.device("cuda" if size != "smoke" and torch.cuda.is_available() else "cpu")
    rows = []
    print(f"{'op':<18} {'shape':<26} {'impl':<16} {'mode':<8} {'ms':>9} {'peak MiB':>9}  note")
    for c in cases(size):
        base = None
        for name in c.impls:
            if (a.impls and name not in a.impls.split(",")) or (dev.type == "cpu" and name not in BASELINES):
                continue
            for mode in modes(c):
                r = harness.measure(c, name, mode, dev, target_s=0.1 if dev.type == "cpu" else 0.25,
                                    warmup=1 if name == "loop" else 3, max_reps=5 if name == "loop" else 100)
                shape = ",".join(f"{k}{v}" for k, v in c.shape.items())
                rows.append({"op": c.op, "impl": name, "mode": mode, "shape": c.shape,
                             "dtype": harness.DTYPE_NAMES[c.dtype], "flop": c.flop[mode], "bytes": c.bytes[mode], **r})
                if r["status"] != "ok":
                    print(f"{c.op:<18} {shape:<26} {name:<16} {mode:<8} {r['status']:>9}  {r['reason'][:80]}")
                    continue
                if name in BASELINES:
                    base = r["median_ms"]
                peak = r.get("peak_mem_bytes")
                note = f"{base / r['median_ms']:.1f}x {'eager' if c.op != 'gae' else 'the loop'}" if base else ""
                print(f"{c.op:<18} {shape:<26} {name:<16} {mode:<8} {r['median_ms']:9.3f} "
                      f"{'' if peak is None else f'{peak / 2**20:9.1f}':>9}  {note}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    harness.write_rows(a.out, dev, rows)
    return rows


if __name__ == "__main__":
    main()
