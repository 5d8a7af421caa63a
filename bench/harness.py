"""Shared benchmark harness: cases (inputs, implementations, FLOP and byte counts) and timing.

A *case* is one op at one shape and dtype. It knows how to draw fresh inputs, which tensors of
its output to back-propagate through, its FLOP and byte counts per mode, and the implementations
to time: our backends (``reference``, ``triton``, ``cuda`` through the public API with
``backend=``), ``compile`` (``torch.compile`` of the reference) and the peers that exist for the
op (SDPA backends, FlexAttention, ``F.linear_cross_entropy``, Liger-Kernel, Cut Cross-Entropy).
An implementation that cannot run here is reported as ``missing`` and one that raises as
``failed``, each with its reason; nothing is faked.

Modes: ``fwd`` (training forward: inputs require grad, so the op saves what backward needs),
``bwd`` (backward only; the forward runs untimed before each timed backward) and ``fwd+bwd``.

Timing (``measure``): warm-up runs (they also absorb compilation and autotuning), then the median
of repeated runs; on CUDA each run is bracketed by CUDA events, and several input sets rotate so
that small inputs are not served from L2. Peak memory on CUDA is ``max_memory_allocated`` during
one run minus what was allocated before it (the resident inputs), i.e. what the op adds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

import rlhf_ops as ro
from rlhf_ops import _registry

from .roofline import time_once

MODES = ("fwd", "bwd", "fwd+bwd")
OUR_BACKENDS = ("reference", "triton", "cuda")
SIZES = ("smoke", "quick", "llm")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}


class Missing(Exception):
    """The implementation is not available here (not installed, no GPU, not implemented)."""


# ------------------------------------------------------------------------------ the cases ---

@dataclasses.dataclass
class Case:
    op: str                      # public op name (rlhf_ops.<op>)
    family: str                  # the bench_<family>.py file it belongs to
    shape: dict                  # sizes, as written to the results
    dtype: torch.dtype
    x: int                       # the swept size (plot x axis)
    series: str                  # the fixed parameters (one plot line per impl and series)
    make: Callable[[torch.device], dict]          # fresh inputs: {"args": [...], "kw": {...}}
    diff: Callable[[Any], list]                   # output -> tensors to back-propagate through
    flop: dict                   # mode -> FLOP count (the standard count, no recomputation)
    bytes: dict                  # mode -> bytes that must move (HBM reads + writes)
    bound: str                   # "memory" (judge GB/s vs copy) or "compute" (TFLOP/s vs matmul)
    impls: dict = dataclasses.field(default_factory=dict)   # name -> fn(inputs) -> output
    priority: bool = False       # a goal shape from the issues: measured first

    @property
    def id(self) -> str:
        return f"{self.op}-" + "-".join(f"{k}{v}" for k, v in self.shape.items()) + \
            f"-{DTYPE_NAMES[self.dtype]}"


def _ours(op: str, backend: str, call: Callable) -> Callable:
    """Our op on one backend; an unavailable backend is Missing with rlhf_ops's reason."""
    def fn(inp):
        try:
            return call(inp, backend)
        except NotImplementedError as e:
            raise Missing(f"not implemented: {e}") from None
        except RuntimeError as e:
            # docs/design.md: naming a backend that cannot run here is an error that says why
            if backend not in ro.available_backends() or (backend == "cuda" and inp["device"].type != "cuda"):
                raise Missing(str(e)) from None
            raise
    return fn


def _compiled(call: Callable) -> Callable:
    """torch.compile of the reference backend (compiled once per case, on first use)."""
    state = {}

    def fn(inp):
        if "f" not in state:
            state["f"] = torch.compile(lambda *a, **k: call({"args": a, "kw": k}, "reference"),
                                       dynamic=False)
        return state["f"](*inp["args"], **inp["kw"])
    return fn


def _rand_targets(n_shape, V, device):
    return torch.randint(0, V, n_shape, device=device)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_(True)


def _add_ours_and_compile(case: Case, call: Callable, compile_ok: bool):
    for b in OUR_BACKENDS:
        case.impls[b] = _ours(case.op, b, call)
    if compile_ok:
        case.impls["compile"] = _compiled(call)


# --- cross entropy -------------------------------------------------------------------------

def _ce_case(N, V, dtype, size, priority=False):
    e = torch.tensor([], dtype=dtype).element_size()
    # fwd: read logits once (N·V·e) + targets (8N), write loss (4N) and lse = (m, log s) (8N).
    # bwd: read logits and write the gradient (2·N·V·e) + targets, lse, grad_loss (20N).
    nv = N * V
    case = Case(
        op="cross_entropy", family="cross_entropy", shape={"N": N, "V": V}, dtype=dtype, x=V,
        series=f"N={N}",
        make=lambda dev: {"device": torch.device(dev), "args": [
            _leaf(torch.randn(N, V, device=dev, dtype=dtype)), _rand_targets((N,), V, dev)],
            "kw": {}},
        diff=lambda out: [out],
        # softmax cross-entropy ≈ 3 FLOP per logit forward (max/sub, exp, add), 4 backward.
        flop={"fwd": 3 * nv, "bwd": 4 * nv, "fwd+bwd": 7 * nv},
        bytes={"fwd": nv * e + 20 * N, "bwd": 2 * nv * e + 20 * N, "fwd+bwd": 3 * nv * e + 40 * N},
        bound="memory", priority=priority)

    def call(inp, backend):
        return ro.cross_entropy(*inp["args"], backend=backend, **inp["kw"])
    _add_ours_and_compile(case, call, size != "smoke")
    if size != "smoke":
        case.impls["torch_ce"] = lambda inp: F.cross_entropy(*inp["args"])
        case.impls["liger"] = _liger_ce
    return case


def _liger_ce(inp):
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError as e:
        raise Missing(f"liger-kernel is not installed ({e})") from None
    return LigerCrossEntropyLoss()(*inp["args"])


def _lce_case(N, d, V, dtype, size, priority=False):
    e = torch.tensor([], dtype=dtype).element_size()
    # matmul FLOPs: forward 2·N·d·V, backward 4·N·d·V (dh and dW); the fused backends recompute
    # the logits in backward (another 2·N·d·V) which is not counted as useful work.
    io = (N * d + V * d) * e
    case = Case(
        op="linear_cross_entropy", family="cross_entropy", shape={"N": N, "d": d, "V": V},
        dtype=dtype, x=V, series=f"N={N},d={d}",
        make=lambda dev: {"device": torch.device(dev), "args": [
            _leaf(torch.randn(N, d, device=dev, dtype=dtype) / math.sqrt(d)),
            _leaf(torch.randn(V, d, device=dev, dtype=dtype) / math.sqrt(d)),
            _rand_targets((N,), V, dev)], "kw": {}},
        diff=lambda out: [out],
        flop={"fwd": 2 * N * d * V, "bwd": 4 * N * d * V, "fwd+bwd": 6 * N * d * V},
        # fwd reads hidden and weight; bwd reads them again and writes dh and dW.
        bytes={"fwd": io + 20 * N, "bwd": 2 * io + 20 * N, "fwd+bwd": 3 * io + 40 * N},
        bound="compute", priority=priority)

    def call(inp, backend):
        return ro.linear_cross_entropy(*inp["args"], backend=backend, **inp["kw"])
    _add_ours_and_compile(case, call, size != "smoke")
    if size != "smoke":
        case.impls["torch_linear_ce"] = _torch_linear_ce
        case.impls["liger"] = _liger_lce
        case.impls["cce"] = _cce
    return case


def _torch_linear_ce(inp):
    opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if not hasattr(F, "linear_cross_entropy") or opts is None:
        raise Missing(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
    h, w, t = inp["args"]
    return F.linear_cross_entropy(h, w, t, options=opts())


def _liger_lce(inp):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise Missing(f"liger-kernel is not installed ({e})") from None
    h, w, t = inp["args"]
    return LigerFusedLinearCrossEntropyLoss()(w, h, t)


def _cce(inp):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Missing(f"cut-cross-entropy is not installed ({e})") from None
    h, w, t = inp["args"]
    return linear_cross_entropy(h, w, t)


# --- attention -----------------------------------------------------------------------------

def _attn_case(B, H, T, D, causal, dtype, size, priority=False):
    e = torch.tensor([], dtype=dtype).element_size()
    # FLOPs: 4·B·H·T·S·D forward (two matmuls), halved when causal; backward 2.5× forward.
    fwd = 4 * B * H * T * T * D // (2 if causal else 1)
    x = B * H * T * D * e
    case = Case(
        op="attention", family="attention",
        shape={"B": B, "H": H, "T": T, "D": D, "causal": int(causal)}, dtype=dtype, x=T,
        series=f"D={D},{'causal' if causal else 'full'}",
        make=lambda dev: {"device": torch.device(dev), "args": [
            _leaf(torch.randn(B, H, T, D, device=dev, dtype=dtype)) for _ in range(3)],
            "kw": {"causal": causal}},
        diff=lambda out: [out],
        flop={"fwd": fwd, "bwd": int(2.5 * fwd), "fwd+bwd": int(3.5 * fwd)},
        # fwd reads q, k, v and writes o; bwd reads q, k, v, o, dO and writes dq, dk, dv.
        bytes={"fwd": 4 * x, "bwd": 8 * x, "fwd+bwd": 12 * x},
        bound="compute", priority=priority)

    def call(inp, backend):
        return ro.attention(*inp["args"], backend=backend, **inp["kw"])
    _add_ours_and_compile(case, call, size != "smoke")
    if size != "smoke":
        for name in ("flash", "efficient", "cudnn", "math"):
            case.impls[f"sdpa_{name}"] = _sdpa(name)
        case.impls["flex"] = _flex()
    return case


def _sdpa(name):
    def fn(inp):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = inp["args"]
        kind = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[name]
        if not hasattr(SDPBackend, kind):
            raise Missing(f"torch {torch.__version__} has no SDPA backend {kind}")
        # T == S in every case, so SDPA's top-left causal mask equals our bottom-right one.
        try:
            with sdpa_kernel(getattr(SDPBackend, kind)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=inp["kw"]["causal"])
        except RuntimeError as e:
            if "No viable backend" in str(e) or "No available kernel" in str(e):
                raise Missing(f"SDPA {name} cannot run these inputs here: {str(e)[:300]}") from None
            raise
    return fn


def _flex():
    state = {}

    def fn(inp):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Missing(f"FlexAttention is not in torch {torch.__version__} ({e})") from None
        q = inp["args"][0]
        T = q.shape[2]
        if "f" not in state:
            state["f"] = torch.compile(flex_attention, dynamic=False)
        mask = None
        if inp["kw"]["causal"]:
            key = (T, str(q.device))
            if key not in state:
                state[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T,
                                               device=q.device)
            mask = state[key]
        return state["f"](*inp["args"], block_mask=mask)
    return fn


# --- pairwise reward loss ------------------------------------------------------------------

def _reward_case(B, K, dtype, size, priority=False):
    e = torch.tensor([], dtype=dtype).element_size()
    pairs = K * (K - 1) // 2
    case = Case(
        op="pairwise_reward_loss", family="reward_loss", shape={"B": B, "K": K}, dtype=dtype,
        x=B, series=f"K={K}",
        make=lambda dev: {"device": torch.device(dev), "args": [
            _leaf(torch.randn(B, K, device=dev, dtype=dtype)),
            torch.rand(B, K, device=dev).argsort(-1)], "kw": {}},
        diff=lambda out: [out],
        # ≈ 10 FLOP per pair (difference, softplus, its derivative, sums), both directions.
        flop={"fwd": 10 * B * pairs, "bwd": 2 * B * K, "fwd+bwd": 10 * B * pairs + 2 * B * K},
        # fwd reads rewards and ranks; bwd reads a [B, K] fp32 gradient and writes d rewards.
        bytes={"fwd": B * K * (e + 8) + 4 * B, "bwd": B * K * (4 + e),
               "fwd+bwd": B * K * (2 * e + 12) + 4 * B},
        bound="memory", priority=priority)

    def call(inp, backend):
        return ro.pairwise_reward_loss(*inp["args"], backend=backend, **inp["kw"])
    _add_ours_and_compile(case, call, size != "smoke")
    return case


# --- token log-probs and KL penalty --------------------------------------------------------

def _logits(shape, dtype, dev):
    return torch.randn(*shape, device=dev, dtype=dtype)


def _tlp_case(B, T, V, dtype, size, priority=False):
    e = torch.tensor([], dtype=dtype).element_size()
    n, nv = B * T, B * T * V
    case = Case(
        op="token_logprobs", family="kl_penalty", shape={"B": B, "T": T, "V": V}, dtype=dtype,
        x=V, series=f"BT={n}",
        make=lambda dev: {"device": torch.device(dev), "args": [
            _leaf(_logits((B, T, V), dtype, dev)), _rand_targets((B, T), V, dev)], "kw": {}},
        diff=lambda out: [out],
        flop={"fwd": 3 * nv, "bwd": 4 * nv, "fwd+bwd": 7 * nv},
        bytes={"fwd": nv * e + 12 * n, "bwd": 2 * nv * e + 16 * n, "fwd+bwd": 3 * nv * e + 28 * n},
        bound="memory", priority=priority)

    def call(inp, backend):
        return ro.token_logprobs(*inp["args"], backend=backend, **inp["kw"])
    _add_ours_and_compile(case, call, size != "smoke")
    if size != "smoke":
        case.impls["liger"] = _liger_logprobs
    return case


def _liger_logprobs(inp):
    # Liger's fused cross entropy with reduction="none" gives −log p(token) per row: the fused
    # selective log-softmax that GRPO/PPO code built on Liger uses for per-token log-probs.
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError as e:
        raise Missing(f"liger-kernel is not installed ({e})") from None
    logits, tokens = inp["args"][:2]
    V = logits.shape[-1]
    return -LigerCrossEntropyLoss(reduction="none")(logits.reshape(-1, V), tokens.reshape(-1))


def _kl_case(B, T, V, dtype, size, priority=False):
    e = torch.tensor([], dtype=dtype).element_size()
    n, nv = B * T, B * T * V
    case = Case(
        op="kl_penalty", family="kl_penalty", shape={"B": B, "T": T, "V": V}, dtype=dtype,
        x=V, series=f"BT={n}",
        make=lambda dev: {"device": torch.device(dev), "args": [
            _leaf(_logits((B, T, V), dtype, dev)), _logits((B, T, V), dtype, dev),
            _rand_targets((B, T), V, dev)], "kw": {"beta": 0.05, "estimator": "k3"}},
        diff=lambda out: [out.logprobs, out.kl] if hasattr(out, "kl") else [out],
        # fwd: one online-softmax sweep over each logit tensor (≈ 4 FLOP per policy logit with
        # the entropy term, 3 per reference logit); bwd: one sweep over the policy logits.
        flop={"fwd": 7 * nv, "bwd": 4 * nv, "fwd+bwd": 11 * nv},
        # fwd reads both logit tensors once and writes six [B, T] fp32 outputs (+ tokens);
        # bwd reads the policy logits and writes their gradient.
        bytes={"fwd": 2 * nv * e + 32 * n, "bwd": 2 * nv * e + 16 * n,
               "fwd+bwd": 4 * nv * e + 48 * n},
        bound="memory", priority=priority)

    def call(inp, backend):
        return ro.kl_penalty(*inp["args"], backend=backend, **inp["kw"])
    _add_ours_and_compile(case, call, size != "smoke")
    if size != "smoke":
        case.impls["liger"] = _liger_kl
    return case


def _liger_kl(inp):
    logits, ref_logits, tokens = inp["args"]
    logp = _liger_logprobs({"args": [logits, tokens]})
    with torch.no_grad():
        ref = _liger_logprobs({"args": [ref_logits, tokens]})
    d = logp - ref
    return torch.expm1(-d) + d  # k3, as the eager and fused cases compute


# --- the case lists ------------------------------------------------------------------------

# The bench_<family>.py files whose cases ``cases`` builds: the ``bench`` families of the op
# registry (rlhf_ops/_registry.py), in its order.
FAMILIES = _registry.bench_families()


def _cross_entropy_cases(size, bf16):
    if size == "smoke":
        return [_ce_case(32, 500, bf16, size), _lce_case(32, 64, 500, torch.float32, size)]
    out = [_ce_case(8192, 128256, bf16, size, True), _lce_case(8192, 4096, 128256, bf16, size, True)]
    if size == "llm":
        out += [_ce_case(8192, 32000, bf16, size), _lce_case(8192, 4096, 32000, bf16, size)]
    return out


def _attention_cases(size, bf16):
    if size == "smoke":
        return [_attn_case(2, 2, 33, 16, True, torch.float32, size),
                _attn_case(1, 2, 33, 16, False, torch.float32, size)]
    out = [_attn_case(4, 16, 4096, 128, True, bf16, size, True)]
    if size == "llm":
        for D in (128, 64):
            for causal in (True, False):
                for T in (512, 1024, 2048, 4096, 8192, 16384):
                    if (D, causal, T) != (128, True, 4096):
                        out.append(_attn_case(16384 // T, 2048 // D, T, D, causal, bf16, size))
    return out


def _reward_loss_cases(size, bf16):
    if size == "smoke":
        return [_reward_case(8, 4, torch.float32, size), _reward_case(5, 9, torch.float32, size)]
    out = [_reward_case(1024, 9, torch.float32, size, True)]
    if size == "llm":
        out += [_reward_case(B, K, torch.float32, size) for K in (4, 9) for B in (64, 1024, 16384)
                if (B, K) != (1024, 9)]
    return out


def _kl_penalty_cases(size, bf16):
    if size == "smoke":
        return [_tlp_case(2, 8, 300, bf16, size), _kl_case(2, 8, 300, bf16, size)]
    out = [_kl_case(4, 2048, 128256, bf16, size, True), _tlp_case(4, 2048, 128256, bf16, size, True)]
    if size == "llm":
        out += [_kl_case(4, 2048, 32000, bf16, size), _tlp_case(4, 2048, 32000, bf16, size)]
    return out


# family -> its case builder (size, the low-precision dtype) -> cases; one per FAMILIES entry
_BUILDERS = {"cross_entropy": _cross_entropy_cases, "attention": _attention_cases,
             "reward_loss": _reward_loss_cases, "kl_penalty": _kl_penalty_cases}


def cases(family: str, size: str) -> list[Case]:
    """The cases of one bench file at ``size``: smoke (tiny, CPU), quick (the goal shapes of the
    issues) or llm (the full LLM-scale sweep; goal shapes first)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if family not in FAMILIES:
        raise ValueError(f"unknown bench family {family!r}; expected one of {FAMILIES}")
    if family not in _BUILDERS:
        raise ValueError(f"bench family {family!r} (rlhf_ops/_registry.py) has no case builder in "
                         f"bench/harness.py _BUILDERS")
    return _BUILDERS[family](size, torch.bfloat16)


def triton_smoke_case() -> Case:
    """The one tiny Triton case CI runs under the interpreter (a few seconds)."""
    return _ce_case(4, 300, torch.float32, "smoke")


# ------------------------------------------------------------------------------ timing ---

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(inp):
    for t in inp["args"]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def _grads_for(tensors):
    """Upstream gradients: 1 for a scalar loss, random for per-element outputs."""
    return [torch.ones_like(t) if t.dim() == 0 else torch.randn_like(t) for t in tensors]


def prepare(case: Case, impl: Callable, mode: str, inp: dict, grads: dict, key) -> Callable:
    """Untimed setup of one run; returns the callable to time."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _zero_grads(inp)
    if mode == "fwd":
        return lambda: impl(inp)
    if mode == "bwd":
        outs = case.diff(impl(inp))
        if key not in grads:  # drawn once per input set, reused by every run
            grads[key] = _grads_for(outs)
        gs = grads[key]
        return lambda: torch.autograd.backward(outs, gs)

    def run():
        outs = case.diff(impl(inp))
        if key not in grads:  # first (warm-up) run: draw the upstream gradients, then reuse them
            grads[key] = _grads_for(outs)
        torch.autograd.backward(outs, grads[key])
    return run


def n_input_sets(case: Case, inp: dict, device: torch.device) -> int:
    """Rotate enough input sets that together they exceed L2 (≥ 128 MiB), at most 8."""
    if device.type != "cuda":
        return 1
    nbytes = sum(t.numel() * t.element_size() for t in inp["args"] if isinstance(t, torch.Tensor))
    return max(1, min(8, math.ceil((128 << 20) / max(nbytes, 1))))


def measure(case: Case, name: str, mode: str, device, *, warmup: int = 3, reps: int | None = None,
            target_s: float = 0.25, max_reps: int = 100) -> dict:
    """Time ``case.impls[name]`` in ``mode``. Returns {"status": "ok", "median_ms", "peak_mem_bytes",
    "reps"} or {"status": "missing"|"failed", "reason"}."""
    device = torch.device(device)
    impl = case.impls[name]
    try:
        sets = [case.make(device)]
        sets += [case.make(device) for _ in range(n_input_sets(case, sets[0], device) - 1)]
        grads: dict = {}
        times = []
        i = 0

        def once(timed: bool):
            nonlocal i
            k = i % len(sets)
            i += 1
            ms = time_once(prepare(case, impl, mode, sets[k], grads, k), device)
            if timed:
                times.append(ms)
            return ms

        est = min(once(False) for _ in range(max(warmup, 1)))
        peak = None
        if device.type == "cuda":
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            once(False)
            _sync(device)
            peak = int(torch.cuda.max_memory_allocated(device) - base)
        n = reps if reps is not None else max(3, min(max_reps, int(target_s * 1e3 / max(est, 1e-3))))
        for _ in range(n):
            once(True)
        return {"status": "ok", "median_ms": statistics.median(times), "peak_mem_bytes": peak,
                "reps": n}
    except Missing as e:
        return {"status": "missing", "reason": str(e)}
    except NotImplementedError as e:  # e.g. FlexAttention's backward on CPU
        return {"status": "missing", "reason": f"NotImplementedError: {str(e)[:500]}"}
    except Exception as e:  # noqa: BLE001 - a failing implementation is reported, not hidden
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:500]}"}


def rates(case: Case, mode: str, median_ms: float, roofline: dict | None) -> dict:
    """Achieved TFLOP/s and GB/s, and the fraction of the measured roofline that bounds the op."""
    s = median_ms * 1e-3
    tflops = case.flop[mode] / s / 1e12 if s > 0 else 0.0
    gbps = case.bytes[mode] / s / 1e9 if s > 0 else 0.0
    frac = None
    if roofline:
        peak = roofline.get("bf16_tflops") if case.bound == "compute" else roofline.get("hbm_gbps")
        got = tflops if case.bound == "compute" else gbps
        frac = got / peak if peak else None
    return {"tflops": tflops, "gbps": gbps, "roofline_frac": frac}


def run_pytest_benchmark(benchmark, case: Case, name: str, mode: str, device) -> None:
    """Drive pytest-benchmark's ``benchmark`` fixture for one (case, impl, mode)."""
    import pytest

    device = torch.device(device)
    inp = case.make(device)
    impl = case.impls[name]
    grads: dict = {}
    try:
        prepare(case, impl, mode, inp, grads, 0)()  # check it runs (and warm it up)
    except Missing as e:
        pytest.skip(f"{name} missing: {e}")

    def setup():
        fn = prepare(case, impl, mode, inp, grads, 0)
        return (fn,), {}

    def target(fn):
        fn()
        _sync(device)

    benchmark.extra_info.update({"op": case.op, "shape": case.shape, "mode": mode,
                                 "flop": case.flop[mode], "bytes": case.bytes[mode]})
    benchmark.pedantic(target, setup=setup, rounds=5 if device.type == "cuda" else 1,
                       warmup_rounds=1 if device.type == "cuda" else 0)


# ------------------------------------------------------------- standalone bench files' helpers ---

def parametrize(metafunc, argnames: tuple, cases: list, modes: Callable, keep: Callable = lambda impl: True) -> None:
    """pytest_generate_tests of a bench file with its own cases: (case, impl, mode) for every
    implementation of every case that ``keep(impl)`` accepts and ``--bench-impls`` names (all when
    not given), each mode of ``modes(case)``; ids ``<case id>-<impl>-<mode>``."""
    impls = metafunc.config.getoption("--bench-impls", None)
    impls = impls.split(",") if impls else None
    params, ids = [], []
    for c in cases:
        for name in c.impls:
            if not keep(name) or (impls and name not in impls):
                continue
            for mode in modes(c):
                params.append((c, name, mode))
                ids.append(f"{c.id}-{name}-{mode}")
    metafunc.parametrize(argnames, params, ids=ids)


def write_rows(path: str | None, device: torch.device, rows: list, **extra) -> None:
    """A bench file's ``--out``: {"device", "torch", **extra, "rows"} as JSON (nothing without a path)."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, **extra, "rows": rows}, f, indent=1)
