"""What the batch-invariant mode costs: every op, and torch's routed aten ops, with and without it.

Two groups, each timed with the mode off and on (the same inputs, the same implementation):
1. aten (``ro.batch_invariant(aten=True)`` vs torch's own kernels, i.e. cuBLAS and ATen's
   reductions): mm at 4,096 × 4,096 × 4,096 bf16 (the issue's goal: within 25 % of cuBLAS), a
   decode-shaped linear (8 rows × 4,096 → 4,096 bf16, where a fixed 128-row tile is mostly empty),
   log_softmax forward + backward over [4,096, 32,000] fp32, mean over the last dim of
   [8,192, 4,096] fp32 (RMSNorm's statistic) and sum over dim 0 of [8,192, 4,096] bf16 (a bias
   gradient: the batch-invariant kernel copies the transposed rows first).
2. ops (``ro.batch_invariant()`` vs off) on the triton and cuda backends, forward + backward:
   the policy head linear_token_logprobs with entropy at N = 8,192, H = 4,096, V = 151,936 bf16
   (goal: ≤ 15 % slower), attention causal B = 4, H = 16, T = 4,096, D = 128 bf16 and
   attention_varlen on 8 packed sequences of 16,384 tokens in all (goal: ≤ 20 %), cross_entropy,
   linear_cross_entropy, token_logprobs, kl_penalty, pairwise_reward_loss and gae at the shapes
   of their own benchmarks.
The goals are the issue's and are stated, never claimed: only a GPU run says whether they are met
(the table's "goal" column). On a CPU (``--size smoke``, the default there) tiny shapes run under
the Triton interpreter: a check that the code runs, never a speed.

    python -m bench.bench_batch_invariant [--size smoke|quick] [--groups aten,ops] [--out rows.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os

import torch

import rlhf_ops as ro

from bench import harness

GOALS = {"mm": 0.25, "policy_head": 0.15, "attention": 0.20, "attention_varlen": 0.20}


def _case(op, shape, dtype, make, call, flop, nbytes, bound, diff=lambda out: [out], modes=("fwd",)):
    c = harness.Case(op=op, family="batch_invariant", shape=shape, dtype=dtype, x=0, series="",
                     make=make, diff=diff, flop={m: flop for m in harness.MODES},
                     bytes={m: nbytes for m in harness.MODES}, bound=bound)
    c.impls["torch"] = call
    c.modes = modes
    return c


# ------------------------------------------------------------------------------ aten group ---

def aten_cases(size: str) -> list[harness.Case]:
    small = size == "smoke"
    bf16, fp32 = torch.bfloat16, torch.float32
    mdt = fp32 if small else bf16
    out = []

    def mm(M, K, N, dtype, name):
        e = torch.tensor([], dtype=dtype).element_size()
        return _case(name, {"M": M, "K": K, "N": N}, dtype,
                     lambda dev: {"device": torch.device(dev), "kw": {},
                                  "args": [torch.randn(M, K, device=dev, dtype=dtype),
                                           torch.randn(K, N, device=dev, dtype=dtype) / math.sqrt(K)]},
                     lambda inp: torch.mm(*inp["args"]), 2 * M * K * N, (M * K + K * N + M * N) * e,
                     "compute")

    out.append(mm(40, 24, 40, mdt, "mm") if small else mm(4096, 4096, 4096, mdt, "mm"))
    out.append(mm(3, 24, 40, mdt, "linear_decode") if small else mm(8, 4096, 4096, mdt, "linear_decode"))
    R, L = (8, 300) if small else (4096, 32000)
    out.append(_case("log_softmax", {"R": R, "L": L}, fp32,
                     lambda dev: {"device": torch.device(dev), "kw": {},
                                  "args": [torch.randn(R, L, device=dev).requires_grad_()]},
                     lambda inp: torch.log_softmax(inp["args"][0], -1), 5 * R * L, 4 * 4 * R * L,
                     "memory", modes=("fwd+bwd",)))
    R, L = (16, 64) if small else (8192, 4096)
    out.append(_case("mean_lastdim", {"R": R, "L": L}, fp32,
                     lambda dev: {"device": torch.device(dev), "kw": {},
                                  "args": [torch.randn(R, L, device=dev)]},
                     lambda inp: inp["args"][0].mean(-1), R * L, 4 * R * L, "memory"))
    out.append(_case("sum_dim0", {"R": R, "L": L}, bf16,
                     lambda dev: {"device": torch.device(dev), "kw": {},
                                  "args": [torch.randn(R, L, device=dev, dtype=bf16)]},
                     lambda inp: inp["args"][0].sum(0), R * L, 2 * R * L, "memory"))
    return out


# -------------------------------------------------------------------------------- op group ---

def _ours(case: harness.Case, op: str, call):
    case.impls = {b: harness._ours(op, b, call) for b in ("triton", "cuda")}
    return case


def _policy_head(N, H, V, dtype):
    e = torch.tensor([], dtype=dtype).element_size()
    io = (N * H + V * H) * e

    def make(dev):
        return {"device": torch.device(dev), "kw": {}, "args": [
            (torch.randn(N, H, device=dev, dtype=dtype) / math.sqrt(H)).requires_grad_(),
            (torch.randn(V, H, device=dev, dtype=dtype) / math.sqrt(H)).requires_grad_(),
            torch.randint(0, V, (N,), device=dev)]}

    def call(inp, backend):
        lp, ent = ro.linear_token_logprobs(*inp["args"], return_entropy=True, backend=backend)
        return lp.sum() - 0.01 * ent.sum()

    c = _case("policy_head", {"N": N, "H": H, "V": V}, dtype, make, None, 6 * N * H * V, 3 * io,
              "compute", modes=("fwd+bwd",))
    return _ours(c, "linear_token_logprobs", call)


def _varlen(n_seq, total, Hh, D, dtype):
    lens = [total // n_seq + (i - n_seq // 2) * (total // (4 * n_seq)) for i in range(n_seq)]
    lens[-1] += total - sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    e = torch.tensor([], dtype=dtype).element_size()
    flop = sum(2 * Hh * n * n * D for n in lens)          # causal: half of 4·H·n²·D per sequence

    def make(dev):
        return {"device": torch.device(dev), "kw": {}, "args": [
            torch.randn(total, Hh, D, device=dev, dtype=dtype).requires_grad_() for _ in range(3)]
            + [cu.to(dev), cu.to(dev), max(lens), max(lens)]}

    def call(inp, backend):
        return ro.attention_varlen(*inp["args"], causal=True, backend=backend)

    c = _case("attention_varlen", {"n": n_seq, "N": total, "H": Hh, "D": D}, dtype, make, None,
              int(3.5 * flop), 12 * total * Hh * D * e, "compute", modes=("fwd+bwd",))
    return _ours(c, "attention_varlen", call)


def _gae(B, T):
    def make(dev):
        return {"device": torch.device(dev), "kw": {},
                "args": [torch.randn(B, T, device=dev), torch.randn(B, T, device=dev),
                         torch.rand(B, T, device=dev) > 0.1]}

    c = _case("gae", {"B": B, "T": T}, torch.float32, make, None, 6 * B * T, 17 * B * T, "memory",
              diff=lambda out: [])
    return _ours(c, "gae", lambda inp, backend: ro.gae(*inp["args"], backend=backend))


def op_cases(size: str) -> list[harness.Case]:
    bf16, fp32 = torch.bfloat16, torch.float32
    if size == "smoke":
        out = [_policy_head(6, 32, 300, fp32), harness._attn_case(1, 2, 33, 16, True, fp32, size),
               _varlen(2, 40, 2, 16, fp32)]
    else:
        out = [_policy_head(8192, 4096, 151936, bf16),
               harness._attn_case(4, 16, 4096, 128, True, bf16, size),
               _varlen(8, 16384, 16, 128, bf16),
               harness._ce_case(8192, 128256, bf16, size), harness._lce_case(8192, 4096, 128256, bf16, size),
               harness._tlp_case(4, 2048, 128256, bf16, size), harness._kl_case(4, 2048, 128256, bf16, size),
               harness._reward_case(1024, 9, fp32, size), _gae(64, 8192)]
    for c in out:
        if not hasattr(c, "modes"):
            c.impls = {b: c.impls[b] for b in ("triton", "cuda") if b in c.impls}
            c.modes = ("fwd+bwd",)
    return out


# ------------------------------------------------------------------------------------ main ---

def _default_size() -> str:
    return "quick" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "smoke"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default=None, choices=("smoke", "quick"))
    ap.add_argument("--groups", default="aten,ops")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    size = a.size or _default_size()
    gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    dev = torch.device("cuda" if gpu else "cpu")
    smoke = size == "smoke" or not gpu          # tiny shapes or the interpreter: never a speed
    groups = a.groups.split(",")
    cases = ([("aten", c) for c in aten_cases(size)] if "aten" in groups else []) + \
            ([("ops", c) for c in op_cases(size)] if "ops" in groups else [])
    timing = dict(warmup=1, reps=1) if smoke else dict(target_s=0.5)
    if size != "smoke" and not gpu:
        raise SystemExit("bench_batch_invariant: --size quick needs a GPU (TRITON_INTERPRET unset)")
    rows = []
    print(f"{'group':<5} {'op':<18} {'shape':<30} {'impl':<7} {'mode':<8} {'off ms':>9} {'on ms':>9} "
          f"{'slower':>7}  goal")
    for group, c in cases:
        for name in c.impls:
            if dev.type == "cpu" and name == "cuda":
                continue
            for mode in c.modes:
                res = {}
                for on in (False, True):
                    block = (ro.batch_invariant(aten=group == "aten") if on else contextlib.nullcontext())
                    with block:
                        res[on] = harness.measure(c, name, mode, dev, **timing)
                shape = ",".join(f"{k}{v}" for k, v in c.shape.items())
                row = {"group": group, "op": c.op, "impl": name, "mode": mode, "shape": c.shape,
                       "dtype": harness.DTYPE_NAMES[c.dtype], "off": res[False], "on": res[True]}
                if all(r["status"] == "ok" for r in res.values()):
                    slower = res[True]["median_ms"] / res[False]["median_ms"] - 1
                    row["slower"] = slower
                    goal = GOALS.get(c.op)
                    verdict = "" if goal is None else (
                        f"≤ {goal:.0%}: " + ("smoke, not a speed" if smoke else
                                             ("met" if slower <= goal else "missed")))
                    print(f"{group:<5} {c.op:<18} {shape:<30} {name:<7} {mode:<8} "
                          f"{res[False]['median_ms']:9.3f} {res[True]['median_ms']:9.3f} "
                          f"{slower:+7.1%}  {verdict}")
                else:
                    why = "; ".join(f"{'on' if k else 'off'}: {r['status']} {r.get('reason', '')[:100]}"
                                    for k, r in res.items() if r["status"] != "ok")
                    print(f"{group:<5} {c.op:<18} {shape:<30} {name:<7} {mode:<8} {why}")
                rows.append(row)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if gpu else "cpu",
                       "smoke": smoke,
                       "torch": torch.__version__, "size": size, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
