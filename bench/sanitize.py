"""Small-shape runs of every Triton kernel and of the cross-entropy / KL / reward / gae CUDA kernels,
forward and backward, for compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

    python bench/sanitize.py --plan                       # the cases, nothing run
    python bench/sanitize.py                              # every case on CUDA tensors
    python bench/sanitize.py --only triton                # cases whose name contains "triton"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 7 \\
        python bench/sanitize.py
    TRITON_INTERPRET=1 python bench/sanitize.py --device cpu   # the triton cases on CPU (a dry run)

bench/gpu_check.sh runs it once plainly (which compiles the Triton kernels, so the sanitized
runs measure the kernels, not the compiler) and then under the four tools side by side. The
shapes cover the kernels' edge paths: rows wider than one program's chunk (V > 65,536, the
split and combine kernels), sizes one past a block, ignored rows, out-of-range targets (the
NaN path that must not read out of bounds), several tokens per row, the entropy gradient,
k1/k3 with a mask, the pairwise kernel's single-tile and tiled paths, attention with GQA, T ≠ S
both ways (rows that see no key), a window with a softcap, varlen with an empty sequence, and
gae's scan dense (a row with no step) and packed (an empty sequence).
The CUDA attention kernels have their own driver in gpu_check.sh (owner: attention CUDA).

Autotuned Triton kernels keep only their first ``--configs`` configs (default 1): a sanitized
autotuning sweep would spend the budget benchmarking. Every public op goes through its wrapper
(``backend=`` named), so a signature change in a custom op does not break this driver.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import rlhf_ops as ro
from rlhf_ops import _registry


def _cases(dev: str):
    """name → thunk. Each thunk runs forward and backward once."""
    state = {}

    def gen():                           # made on first use: --plan touches no device
        if "g" not in state:
            state["g"] = torch.Generator(device=dev).manual_seed(0)
        return state["g"]

    def rnd(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, dtype=dtype, device=dev, generator=gen()).requires_grad_(grad)

    def idx(high, *shape):
        return torch.randint(0, high, shape, device=dev, generator=gen())

    def back(*outs):
        outs = [o for o in outs if o is not None and o.requires_grad]
        torch.autograd.backward([o.float().sum() for o in outs])

    def ce(be):
        def run():
            x = rnd(5, 70001, dtype=torch.bfloat16)            # wide rows: split + combine kernels
            t = idx(70001, 5)
            t[1] = -100
            back(ro.cross_entropy(x, t, backend=be))
            x = rnd(7, 33)                                      # one past a block, label smoothing
            t = idx(33, 7)
            t[::3] = -100
            back(ro.cross_entropy(x, t, label_smoothing=0.1, reduction="none", backend=be))
            back(ro.cross_entropy(x, t, softcap=2.0, backend=be))         # the softcap (tanh) variants
            x = rnd(3, 17, dtype=torch.float64)
            back(ro.cross_entropy(x, idx(17, 3), backend=be, inplace_backward=True))
            h, w, b = rnd(6, 16, dtype=torch.float16), rnd(129, 16, dtype=torch.float16), rnd(129, dtype=torch.float16)
            back(ro.linear_cross_entropy(h, w, idx(129, 6), bias=b, backend=be))
            back(ro.linear_cross_entropy(h, w, idx(129, 6), softcap=1.5, backend=be))
        return run

    def ce_bad_target(be):
        def run():                       # out-of-range targets: NaN rows, no read out of bounds
            x = rnd(4, 37)
            back(ro.cross_entropy(x, torch.tensor([0, 37, -5, 36], device=dev), reduction="none", backend=be))
        return run

    def logprobs(be):
        def run():
            x = rnd(4, 4097, dtype=torch.float16)
            t = idx(4097, 4, 3)
            t[:, 2] = t[:, 0]                                   # repeated tokens
            back(*ro.token_logprobs(x, t, temperature=0.7, return_entropy=True, backend=be))
            x = rnd(3, 70001, dtype=torch.bfloat16)
            back(ro.token_logprobs(x, idx(70001, 3), backend=be))
            back(*ro.token_logprobs(x, idx(70001, 3), softcap=30.0, return_entropy=True, backend=be))
            h, w = rnd(5, 32), rnd(257, 32)
            back(*ro.linear_token_logprobs(h, w, idx(257, 5, 2), return_entropy=True, backend=be))
            back(*ro.linear_token_logprobs(h, w, idx(257, 5), softcap=2.0, temperature=0.7,
                                           return_entropy=True, backend=be))
            for est, mask in (("k1", None), ("k3", torch.tensor([1.0, 0.0, 1.0], device=dev)),
                              ("k2", torch.tensor([True, True, False], device=dev))):
                x, r = rnd(3, 65), rnd(3, 65, grad=False)
                out = ro.kl_penalty(x, r, idx(65, 3), beta=0.1, estimator=est, mask=mask, backend=be)
                back(out.logprobs, out.kl, out.entropy)
        return run

    def reward(be):
        def run():
            for B, K in ((5, 9), (3, 70)):                      # single tile; tiled above 64
                r = rnd(B, K)
                ranks = torch.argsort(torch.rand(B, K, device=dev, generator=gen()), 1)
                ranks[0, : K // 2] = -1                         # absent responses
                back(ro.pairwise_reward_loss(r, ranks, margin=0.5, backend=be))
        return run

    def attention(be):
        def run():
            dt = torch.float16 if dev == "cuda" else torch.float32
            for (B, Hq, Hkv, T, S, D), kw in (((2, 4, 2, 17, 33, 64), {}),
                                              ((1, 2, 1, 33, 17, 128), {}),          # T > S: rows without keys
                                              ((1, 2, 2, 40, 40, 64), {"causal": False}),
                                              ((1, 2, 1, 33, 33, 64), {"window": (8, 0), "softcap": 20.0})):
                q, k, v = rnd(B, Hq, T, D, dtype=dt), rnd(B, Hkv, S, D, dtype=dt), rnd(B, Hkv, S, D, dtype=dt)
                back(ro.attention(q, k, v, backend=be, **kw))
            cu_q = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=dev)
            cu_k = torch.tensor([0, 9, 12, 30], dtype=torch.int32, device=dev)
            q, k, v = rnd(22, 4, 64, dtype=dt), rnd(30, 2, 64, dtype=dt), rnd(30, 2, 64, dtype=dt)
            back(ro.attention_varlen(q, k, v, cu_q, cu_k, 17, 18, backend=be))
        return run

    def gae(be):
        def run():                       # forward only: advantages and returns are not differentiated
            B, T = 3, 1029                                      # past a block; several runs per row
            mask = torch.rand(B, T, device=dev, generator=gen()) < 0.8
            mask[2] = False                                     # a row with no step
            ro.gae(rnd(B, T, grad=False), rnd(B, T, grad=False), mask, gamma=0.99, lam=0.95, backend=be)
            cu = torch.tensor([0, 0, 517, 700, 1029], dtype=torch.int32, device=dev)   # packed, one empty
            ro.gae(rnd(1029, grad=False), rnd(1029, grad=False), mask[0], cu_seqlens=cu, backend=be)
            ro.gae(rnd(2, 33, dtype=torch.float64, grad=False), rnd(2, 33, dtype=torch.float64, grad=False),
                   None, backend=be)
        return run

    # the registry's ``sanitize`` name -> the cases that run it (a name may have several)
    drivers = {"cross_entropy": {"cross_entropy": ce, "cross_entropy_bad_target": ce_bad_target},
               "logprobs_kl": {"logprobs_kl": logprobs}, "pairwise_reward": {"pairwise_reward": reward},
               "attention": {"attention": attention}, "gae": {"gae": gae}}
    cases = {}
    for be in ("triton", "cuda"):
        for name, runs in drivers.items():
            if be in sanitized_backends().get(name, ()) and (name, be) not in ELSEWHERE:
                cases.update({f"{be}/{case}": make(be) for case, make in runs.items()})
    missing = set(sanitized_backends()) - set(drivers)
    if missing:
        raise RuntimeError(f"bench/sanitize.py has no driver for {sorted(missing)} (named by the "
                           f"op registry, rlhf_ops/_registry.py)")
    if dev != "cuda":                       # CPU: only what runs there (triton, under the interpreter)
        cases = {k: v for k, v in cases.items() if k.startswith("triton/") and "bad_target" not in k}
    return cases


# (driver, backend) pairs whose kernels another driver runs under the sanitizer
ELSEWHERE = {("attention", "cuda"): "bench/sanitize_cuda.py (the CUDA attention kernels)"}


def sanitized_backends() -> dict:
    """The registry's sanitize driver names -> the fused backends of the ops that name them."""
    out: dict = {}
    for op in _registry.OPS:
        if op.sanitize:
            fused = [b for b in _registry.backends(op) if b != "reference"]
            out[op.sanitize] = tuple(dict.fromkeys(out.get(op.sanitize, ()) + tuple(fused)))
    return out


def limit_autotune(n: int) -> None:
    """Keep the first ``n`` configs of every autotuned Triton kernel of the package."""
    if n <= 0:
        return
    import importlib
    import triton.runtime.autotuner as at
    for name in sorted({op.kernels for op in _registry.OPS}):
        try:
            mod = importlib.import_module(f"rlhf_ops.kernels.{name}")
        except ImportError:
            continue
        for obj in vars(mod).values():
            if isinstance(obj, at.Autotuner) and len(obj.configs) > n:
                obj.configs = obj.configs[:n]


def run_cases(cases: dict, sync: bool, have: set | None = None, what: str = "sanitize driver") -> int:
    """Run every case (backends not in ``have`` are reported, not run), one line each — the
    "name: ok" lines gpu_check.sh counts — then a last line; the number of cases that raised.
    A failing case does not stop the others."""
    failed = 0
    for name, run in cases.items():
        be = name.split("/")[0]
        if have is not None and be not in have:
            print(f"{name}: NOT run (backend {be} not available)", flush=True)
            continue
        t0 = time.time()
        try:
            run()
            if sync:
                torch.cuda.synchronize()
            print(f"{name}: ok ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, fail at the end
            failed += 1
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"{what} done: {len(cases) - failed} of {len(cases)} cases ran")
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", action="store_true", help="list the cases and exit")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", type=int, default=1, help="autotune configs kept (0: all)")
    a = ap.parse_args(argv)
    cases = {k: v for k, v in _cases(a.device).items() if a.only in k}
    if a.plan:
        print("\n".join(cases))
        return 0
    if a.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: nothing run (use --device cpu with TRITON_INTERPRET=1 for a dry run)")
            return 2
        limit_autotune(a.configs)
    have = set(ro.available_backends()) if a.device == "cuda" else {"triton"}
    return 1 if run_cases(cases, a.device == "cuda", have, "sanitize driver") else 0

if __name__ == "__main__":
    sys.exit(main())
