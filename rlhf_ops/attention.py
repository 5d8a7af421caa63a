"""Attention ``softmax(mask(cap(q kᵀ · scale))) v`` (FlashAttention-2 style on the fused backends).

    out = rlhf_ops.attention(q, k, v, causal=True, scale=None, window=None, softcap=0.0)
    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; Hq % Hkv == 0 (GQA, MQA at Hkv = 1); out like q.

    out = rlhf_ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    causal=True, scale=None, window=None, softcap=0.0)
    flash_attn_varlen_func's layout: q [Nq, Hq, D], k/v [Nk, Hkv, D] hold n sequences packed
    one after another; cu_seqlens_* int32 [n + 1] = (0, cumulative lengths); sequence b is
    q[cu_q[b]:cu_q[b+1]] against k/v[cu_k[b]:cu_k[b+1]]; max_seqlen_* are Python ints (≥ every
    length: they size the launch grid, so the op never reads the lengths on the host).

    out = rlhf_ops.attention_tree(q, k, v, cu_seqlens, parent, max_seqlen, scale=None, softcap=0.0)
    shared-prefix (tree) attention: q, k, v [N, H, D] pack n segments (cu_seqlens int32 [n + 1])
    that form a forest in depth-first pre-order (parent int32 [n], −1 for a root, parent[s] < s);
    a token of segment s sees every token of every ancestor of s and, causally, s up to itself.
    A GRPO group is a prompt (root) and its G completions (children): the prompt runs once.

Backends: ``reference`` runs the eager math of ``reference.attention`` / ``attention_varlen`` in
the input dtype; ``triton`` runs ``rlhf_ops.kernels.attention`` (any head dim that is a multiple of
16 up to 256; fp16, bf16, fp32 — with TF32 matmuls on a GPU when
``torch.backends.cuda.matmul.allow_tf32`` is set — and fp64, accumulated in fp64 so that
``gradcheck`` works); ``cuda`` runs ``torch.ops.rlhf_ops_cuda.attention[_varlen]_fwd/_bwd`` (head
dims 64 and 128, fp16/bf16 only, no window, no softcap). The fused backends never hold the T×S
score matrix: forward saves only the output and two fp32 numbers per query row, the base-2 pair
(m, log2 l) (lse = (m + log2 l)·ln 2; [2, B, Hq, T] dense, [2, Hq, Nq] varlen), and backward
recomputes the probabilities block by block.

Masking. ``causal=True`` is *bottom-right* aligned, as in flash-attn: query i sees key j iff
j ≤ i + S − T, i.e. the last query sees every key (the decoding / chunked-prefill convention);
varlen applies it per sequence with that sequence's T and S. ``F.scaled_dot_product_attention
(is_causal=True)`` is *top-left* aligned (j ≤ i); the two agree when T == S. ``window=(left, right)``
is flash-attn's ``window_size`` (sliding-window attention of Mistral/Gemma): query i sees key j iff
i + S − T − left ≤ j ≤ i + S − T + right, −1 = that side unbounded, and with ``causal`` the right
side is 0. A query row that sees no key (T > S under causal, or a window that leaves it nothing)
outputs zeros and gives zero gradients; SDPA's top-left mask would let such rows attend.
``softcap > 0`` (Gemma-2) maps each scaled score s to softcap·tanh(s / softcap) before the mask
and the softmax; its derivative 1 − tanh² enters the backward.

Determinism. The Triton backward is deterministic: dK/dV are computed by one program per key block
(which loops over every query head of its GQA group and every query block), dQ by one program per
query block, with no atomics, so repeated runs give bitwise identical gradients for a given
block-size config (on a GPU the autotuner picks the config once per length bucket).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _checks, reference

OP = "attention"
OP_VARLEN = "attention_varlen"
OP_TREE = "attention_tree"


def _unit_last(t: Tensor, backend: str) -> Tensor:
    """Triton takes any strides with unit stride over D (e.g. the transposed views of a QKV split);
    the CUDA ops take contiguous tensors."""
    if backend == "cuda":
        return t.contiguous()
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _cuda_op(name: str):
    op = getattr(torch.ops.rlhf_ops_cuda, name, None) if _backend.load_extension() else None
    if op is None:
        raise RuntimeError(f"rlhf_ops: the built CUDA extension has no op rlhf_ops_cuda::{name}; "
                           f"rebuild it (RLHF_OPS_BUILD_CUDA=1 pip install -e .)")
    return op


# ------------------------------------------------------------------------------ custom ops ---
# ``left``/``right`` are the normalised window (−1 = unbounded; causal already folded into
# right = 0); ``causal`` is passed as well because the CUDA kernels take it.

@torch.library.custom_op("rlhf_ops::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, left: int, right: int,
                  softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] → (out [B, Hq, T, D] contiguous, lse [2, B, Hq, T]): the
    base-2 pair (m, log2 l) per row in fp32 (fp64 for fp64 inputs), (+inf, 0) for a row that sees
    no key."""
    q, k, v = (_unit_last(t, backend) for t in (q, k, v))
    if backend == "triton":
        return _backend.triton_kernels("attention").forward(q, k, v, scale, left, right, softcap)
    return _cuda_op("attention_fwd")(q, k, v, causal, scale)


@attention_fwd.register_fake
def _(q, k, v, causal, scale, left, right, softcap, backend):
    B, Hq, T, D = q.shape
    return q.new_empty((B, Hq, T, D)), q.new_empty((2, B, Hq, T), dtype=_checks.acc_dtype(q.dtype))


@torch.library.custom_op("rlhf_ops::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  causal: bool, scale: float, left: int, right: int, softcap: float,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """→ (dq like q, dk like k, dv like v), new contiguous tensors."""
    dout, q, k, v, out = (_unit_last(t, backend) for t in (dout, q, k, v, out))
    if backend == "triton":
        return _backend.triton_kernels("attention").backward(dout, q, k, v, out, lse, scale, left,
                                                              right, softcap)
    return _cuda_op("attention_bwd")(dout, q, k, v, out, lse.contiguous(), causal, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, left, right, softcap, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.rlhf_ops.attention_bwd(dout, q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("rlhf_ops::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, left: int,
                         right: int, softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    """q [Nq, Hq, D], k/v [Nk, Hkv, D], cu_seqlens int32 [n + 1] → (out [Nq, Hq, D] contiguous,
    lse [2, Hq, Nq]: the base-2 pair (m, log2 l) per row, as the dense op)."""
    q, k, v = (_unit_last(t, backend) for t in (q, k, v))
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if backend == "triton":
        return _backend.triton_kernels("attention").varlen_forward(
            q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap)
    return _cuda_op("attention_varlen_fwd")(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal,
                                            scale)


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, left, right,
      softcap, backend):
    Nq, Hq, D = q.shape
    return q.new_empty((Nq, Hq, D)), q.new_empty((2, Hq, Nq), dtype=_checks.acc_dtype(q.dtype))


@torch.library.custom_op("rlhf_ops::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, causal: bool, scale: float, left: int, right: int,
                         softcap: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """→ (dq like q, dk like k, dv like v), new contiguous tensors."""
    dout, q, k, v, out = (_unit_last(t, backend) for t in (dout, q, k, v, out))
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if backend == "triton":
        return _backend.triton_kernels("attention").varlen_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, left, right,
            softcap)
    return _cuda_op("attention_varlen_bwd")(dout, q, k, v, out, lse.contiguous(), cu_q, cu_k,
                                            max_seqlen_q, max_seqlen_k, causal, scale)


@attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      left, right, softcap, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _backward_varlen(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.rlhf_ops.attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k,
                                                         *ctx.args)
    return (dq, dk, dv, None, None) + (None,) * len(ctx.args)


attention_varlen_fwd.register_autograd(_backward_varlen, setup_context=_setup_context_varlen)


# Tree attention: one packed token set, so q and k share cu_seqlens; ``backend`` is "triton" (the
# only fused backend that implements it; kept as an argument so that traces show the backend).

@torch.library.custom_op("rlhf_ops::attention_tree_fwd", mutates_args=())
def attention_tree_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, parent: Tensor,
                       max_seqlen: int, scale: float, softcap: float,
                       backend: str) -> tuple[Tensor, Tensor]:
    """q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens int32 [n + 1], parent int32 [n] → (out [N, Hq, D]
    contiguous, lse [2, Hq, N]: the base-2 pair (m, log2 l) per row, as the varlen op)."""
    _tree_backend(backend)
    q, k, v = (_unit_last(t, backend) for t in (q, k, v))
    return _backend.triton_kernels("attention").tree_forward(
        q, k, v, cu_seqlens.contiguous(), parent.contiguous(), max_seqlen, scale, softcap)


@attention_tree_fwd.register_fake
def _(q, k, v, cu_seqlens, parent, max_seqlen, scale, softcap, backend):
    N, Hq, D = q.shape
    return q.new_empty((N, Hq, D)), q.new_empty((2, Hq, N), dtype=_checks.acc_dtype(q.dtype))


@torch.library.custom_op("rlhf_ops::attention_tree_bwd", mutates_args=())
def attention_tree_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens: Tensor, parent: Tensor, max_seqlen: int, scale: float,
                       softcap: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """→ (dq like q, dk like k, dv like v), new contiguous tensors."""
    _tree_backend(backend)
    dout, q, k, v, out = (_unit_last(t, backend) for t in (dout, q, k, v, out))
    return _backend.triton_kernels("attention").tree_backward(
        dout, q, k, v, out, lse, cu_seqlens.contiguous(), parent.contiguous(), max_seqlen, scale,
        softcap)


@attention_tree_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, parent, max_seqlen, scale, softcap, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _tree_backend(backend: str) -> None:
    if backend != "triton":
        raise NotImplementedError(f"rlhf_ops::attention_tree: no {backend!r} kernels (the capability "
                           f"table refuses this backend before the op is called)")


def _setup_context_tree(ctx, inputs, output):
    q, k, v, cu, parent, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu, parent)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _backward_tree(ctx, dout, dlse):
    q, k, v, out, lse, cu, parent = ctx.saved_tensors
    dq, dk, dv = torch.ops.rlhf_ops.attention_tree_bwd(dout, q, k, v, out, lse, cu, parent, *ctx.args)
    return (dq, dk, dv, None, None) + (None,) * len(ctx.args)


attention_tree_fwd.register_autograd(_backward_tree, setup_context=_setup_context_tree)


# -------------------------------------------------------------------------------- validation ---

def _validate_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, layout: str) -> None:
    """Shapes: dense [B, H, T, D] (``layout`` "BHTD") or packed [N, H, D] ("NHD")."""
    nd = len(layout)
    kv = "[B, Hkv, S, D]" if nd == 4 else "[Nk, Hkv, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.floating(op, name, t, ndim=nd)
    _checks.same_device(op, "q", q, k=k, v=v)
    _checks.same_dtype(op, "q", q, k=k, v=v)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"rlhf_ops.{op}: k and v must have the same shape {kv}, got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    D, Hq, Hkv = q.shape[-1], q.shape[1], k.shape[1]
    if D == 0:
        raise ValueError(f"rlhf_ops.{op}: q/k/v head dim (shape[-1]) must be positive, got 0")
    if nd == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"rlhf_ops.{op}: k/v batch size {k.shape[0]} differs from q's {q.shape[0]} "
                         f"(q [B, Hq, T, D] = {tuple(q.shape)}, k [B, Hkv, S, D] = {tuple(k.shape)})")
    if k.shape[-1] != D:
        raise ValueError(f"rlhf_ops.{op}: k/v head dim {k.shape[-1]} differs from q's {D} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"rlhf_ops.{op}: the number of query heads (q.shape[1] = {Hq}) must be a "
                         f"positive multiple of the number of key/value heads (k.shape[1] = {Hkv})")


def _finite(x) -> bool:
    """math.isfinite that torch.compile traces (floats may be symbolic under dynamic=True)."""
    return x == x and x != math.inf and x != -math.inf


def _scale_arg(op: str, scale, D: int) -> float:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"rlhf_ops.{op}: scale must be None or a finite number, got {scale!r}")
    if scale is not None and not _finite(scale):
        raise ValueError(f"rlhf_ops.{op}: scale must be None or a finite number, got {scale!r}")
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def _window_arg(op: str, window, causal: bool) -> tuple[int, int]:
    """window=None or (left, right), ints ≥ −1 → (left, right) with causal folded in (right = 0)."""
    if window is None:
        left, right = -1, -1
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise TypeError(f"rlhf_ops.{op}: window must be None or a pair (left, right) of ints "
                            f"≥ −1 (−1 = unbounded), got {window!r}")
        for side, w in zip(("left", "right"), window):
            if isinstance(w, bool) or not isinstance(w, int):
                raise TypeError(f"rlhf_ops.{op}: window {side} must be an int ≥ −1 (−1 = unbounded), "
                                f"got {w!r}")
            if w < -1:
                raise ValueError(f"rlhf_ops.{op}: window {side} must be ≥ −1 (−1 = unbounded), got {w}")
        left, right = int(window[0]), int(window[1])
    return left, (0 if causal else right)


def _softcap_arg(op: str, softcap) -> float:
    msg = f"rlhf_ops.{op}: softcap must be a finite number ≥ 0 (0 = off), got {softcap!r}"
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(msg)
    if not _finite(softcap) or softcap < 0:
        raise ValueError(msg)
    return float(softcap)


def _kernel_window(left: int, right: int, T: int, S: int) -> tuple[int, int]:
    """Drop bounds that exclude nothing (query i, key j: j − i − (S − T) ≥ −(S − 1) and ≤ T − 1),
    so a window wider than the sequence runs the plain kernel and ints stay small."""
    return (-1 if left >= S else left), (-1 if right >= T else right)


def _check_backend_support(op: str, be: str, q: Tensor, n_batch: int, window, causal: bool,
                           softcap: float) -> None:
    """What the fused backends accept (``_backend.LIMITS``). ``n_batch`` is B (dense) or the
    number of sequences."""
    refusal = _backend.unsupported(op, be, q.device, dtype=q.dtype, head_dim=q.shape[-1],
                                   n_batch=n_batch, n_heads=q.shape[1], window=window,
                                   causal=causal, softcap=softcap)
    if refusal is not None:
        raise refusal.exception(f"rlhf_ops.{op}")


def _check_cu_seqlens(cu_q: Tensor, cu_k: Tensor, q: Tensor, k: Tensor, max_q, max_k) -> None:
    op = OP_VARLEN
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"rlhf_ops.{op}: {name} must be a torch.Tensor (int32 [n + 1]), got "
                            f"{type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"rlhf_ops.{op}: {name} must have dtype int32 (flash-attn's cu_seqlens), "
                            f"got {str(cu.dtype).replace('torch.', '')}")
        if cu.dim() != 1 or cu.shape[0] == 0:
            raise ValueError(f"rlhf_ops.{op}: {name} must be 1-D [n + 1] with n ≥ 0 (0, then the "
                             f"cumulative lengths), got shape {tuple(cu.shape)}")
    _checks.same_device(op, "q", q, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens_q and cu_seqlens_k must have the same length "
                         f"n + 1 (one entry per sequence, plus one), got {cu_q.shape[0]} and {cu_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)):
            raise TypeError(f"rlhf_ops.{op}: {name} must be a Python int (the longest sequence), "
                            f"got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"rlhf_ops.{op}: {name} must be ≥ 0, got {m}")
    # Value checks read cu_seqlens on the host: eagerly for CPU tensors, RLHF_OPS_DEBUG=1 for CUDA.
    if q.device.type == "meta" or not _backend.debug_checks(q.device) or torch.compiler.is_compiling():
        return
    for name, cu, N, m, mname in (("cu_seqlens_q", cu_q, q.shape[0], max_q, "max_seqlen_q"),
                                  ("cu_seqlens_k", cu_k, k.shape[0], max_k, "max_seqlen_k")):
        c = cu.cpu().long()
        lens = c[1:] - c[:-1]
        if int(c[0]) != 0:
            raise ValueError(f"rlhf_ops.{op}: {name} must start at 0, got {int(c[0])}")
        if lens.numel() and int(lens.min()) < 0:
            b = int((lens < 0).nonzero()[0])
            raise ValueError(f"rlhf_ops.{op}: {name} must be non-decreasing, but entry {b + 1} "
                             f"({int(c[b + 1])}) is smaller than entry {b} ({int(c[b])})")
        if int(c[-1]) != N:
            what = "q.shape[0]" if name == "cu_seqlens_q" else "k.shape[0]"
            raise ValueError(f"rlhf_ops.{op}: the last entry of {name} ({int(c[-1])}) must equal the "
                             f"number of packed tokens {what} = {N}")
        if lens.numel() and int(lens.max()) > m:
            raise ValueError(f"rlhf_ops.{op}: {mname} = {m} is smaller than the longest sequence in "
                             f"{name} ({int(lens.max())})")


def _check_tree(cu: Tensor, parent: Tensor, q: Tensor, k: Tensor, max_seqlen) -> None:
    """Types and shapes of the tree description; its values (cu_seqlens covers the N tokens,
    parent[s] < s, depth-first pre-order, max_seqlen ≥ every "ancestors ‖ s" length) eagerly for
    CPU tensors and with RLHF_OPS_DEBUG=1 for CUDA tensors (a host sync)."""
    op = OP_TREE
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"rlhf_ops.{op}: q, k and v must hold the same N packed tokens (shape[0]), "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    for name, t, what in (("cu_seqlens", cu, "[n + 1] (0, then the cumulative segment lengths)"),
                          ("parent", parent, "[n] (each segment's parent, −1 for a root)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rlhf_ops.{op}: {name} must be a torch.Tensor (int32 {what}), got "
                            f"{type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"rlhf_ops.{op}: {name} must have dtype int32, got "
                            f"{str(t.dtype).replace('torch.', '')}")
        if t.dim() != 1:
            raise ValueError(f"rlhf_ops.{op}: {name} must be 1-D {what}, got shape {tuple(t.shape)}")
    if cu.shape[0] != parent.shape[0] + 1:
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens must have one entry more than parent (n + 1 "
                         f"and n for n segments), got {cu.shape[0]} and {parent.shape[0]}")
    _checks.same_device(op, "q", q, cu_seqlens=cu, parent=parent)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"rlhf_ops.{op}: max_seqlen must be a Python int (the longest "
                        f"\"ancestors ‖ segment\" length), got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"rlhf_ops.{op}: max_seqlen must be ≥ 0, got {max_seqlen}")
    if q.device.type == "meta" or not _backend.debug_checks(q.device) or torch.compiler.is_compiling():
        return
    c, par = cu.cpu().tolist(), parent.cpu().tolist()
    if c[0] != 0:
        raise ValueError(f"rlhf_ops.{op}: cu_seqlens must start at 0, got {c[0]}")
    for s in range(len(par)):
        if c[s + 1] < c[s]:
            raise ValueError(f"rlhf_ops.{op}: cu_seqlens must be non-decreasing, but entry {s + 1} "
                             f"({c[s + 1]}) is smaller than entry {s} ({c[s]})")
    if c[-1] != q.shape[0]:
        raise ValueError(f"rlhf_ops.{op}: the last entry of cu_seqlens ({c[-1]}) must equal the "
                         f"number of packed tokens q.shape[0] = {q.shape[0]}: the segments must "
                         f"cover every token")
    path: list[int] = []            # the ancestors of the previous segment and itself, root first
    total = [0] * len(par)          # "ancestors ‖ s" lengths
    for s, p in enumerate(par):
        if not -1 <= p < s:
            raise ValueError(f"rlhf_ops.{op}: parent[{s}] = {p}: a segment's parent must be an "
                             f"earlier segment (0 ≤ parent[s] < s) or −1 for a root")
        # pre-order: s is a child of the previous segment or of one of its ancestors (so that
        # every segment's descendants come right after it)
        if p != -1 and p not in path:
            raise ValueError(f"rlhf_ops.{op}: the segments are not in depth-first pre-order: "
                             f"segment {s}'s parent {p} is neither segment {s - 1} nor one of its "
                             f"ancestors (a segment's descendants must come right after it)")
        path = path[:path.index(p) + 1] if p != -1 else []
        path.append(s)
        total[s] = c[s + 1] - c[s] + (total[p] if p != -1 else 0)
    if total and max(total) > max_seqlen:
        s = total.index(max(total))
        raise ValueError(f"rlhf_ops.{op}: max_seqlen = {max_seqlen} is smaller than the longest "
                         f"\"ancestors ‖ segment\" length ({total[s]}, segment {s})")


# ------------------------------------------------------------------------------ public API ---

def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
              window: tuple[int, int] | None = None, softcap: float = 0.0,
              backend: str | None = None, cp_group=None, cp_layout: str = "zigzag") -> Tensor:
    """Scaled dot-product attention, ``softmax(mask(cap(q kᵀ · scale))) v``.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA/MQA, k/v never repeated on
    the fused backends); ``scale=None`` means 1/sqrt(D). ``causal`` is bottom-right aligned when
    T != S (query i sees keys j ≤ i + S − T; rows that see no key output 0), unlike SDPA's
    top-left ``is_causal``. ``window=(left, right)``: query i sees keys
    i + S − T − left ≤ j ≤ i + S − T + right (−1 = unbounded; causal makes right 0), as
    flash-attn's ``window_size``. ``softcap > 0``: s → softcap·tanh(s / softcap) before the
    softmax. Differentiable in q, k and v; the Triton backward is deterministic. See the module
    docstring. ``cp_group``: q/k/v are this rank's part (``cp_layout``) of a sequence split over
    the group; ring attention (``rlhf_ops.context_parallel``).
    """
    if cp_group is not None or cp_layout != "zigzag":
        from .context_parallel import cp_attention
        return cp_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                            backend=backend, cp_group=cp_group, cp_layout=cp_layout)
    _validate_qkv(OP, q, k, v, "BHTD")
    scale = _scale_arg(OP, scale, q.shape[-1])
    left, right = _window_arg(OP, window, causal)
    softcap = _softcap_arg(OP, softcap)
    be = _backend.resolve(OP, backend, q.device)
    if be == "reference":
        return reference.attention(q, k, v, causal, scale, window, softcap)
    _check_backend_support(OP, be, q, q.shape[0], window, causal, softcap)
    left, right = _kernel_window(left, right, q.shape[2], k.shape[2])
    out, _ = torch.ops.rlhf_ops.attention_fwd(q, k, v, bool(causal), scale, left, right, softcap, be)
    return out


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                     scale: float | None = None, window: tuple[int, int] | None = None,
                     softcap: float = 0.0, backend: str | None = None, cp_group=None) -> Tensor:
    """Attention over packed variable-length sequences, ``flash_attn_varlen_func``'s layout.

    q [Nq, Hq, D]; k, v [Nk, Hkv, D]; ``cu_seqlens_q``/``cu_seqlens_k`` int32 [n + 1], 0 then the
    cumulative lengths (empty sequences allowed); ``max_seqlen_q``/``max_seqlen_k`` Python ints at
    least the longest length (they size the launch grid; the op never syncs with the host).
    Sequence b's queries see only its own keys, with ``causal`` (bottom-right, per sequence),
    ``window`` and ``softcap`` as in ``attention``; a query row that sees no key outputs zeros.
    Returns [Nq, Hq, D] like q. The values of cu_seqlens are checked (starts at 0, non-decreasing,
    ends at N, lengths ≤ max_seqlen) eagerly for CPU tensors and with RLHF_OPS_DEBUG=1 for CUDA.
    ``cp_group``: every sequence is split zigzag over the group and cu_seqlens/max_seqlen are the
    rank's local ones (``rlhf_ops.context_parallel``).
    """
    if cp_group is not None:
        from .context_parallel import cp_attention_varlen
        return cp_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal=causal, scale=scale, window=window, softcap=softcap,
                                   backend=backend, cp_group=cp_group)
    _validate_qkv(OP_VARLEN, q, k, v, "NHD")
    _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k)
    scale = _scale_arg(OP_VARLEN, scale, q.shape[-1])
    left, right = _window_arg(OP_VARLEN, window, causal)
    softcap = _softcap_arg(OP_VARLEN, softcap)
    be = _backend.resolve(OP_VARLEN, backend, q.device)
    if be == "reference":
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, causal, scale, window, softcap)
    _check_backend_support(OP_VARLEN, be, q, cu_seqlens_q.shape[0] - 1, window, causal, softcap)
    left, right = _kernel_window(left, right, max_seqlen_q, max_seqlen_k)
    out, _ = torch.ops.rlhf_ops.attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                     int(max_seqlen_q), int(max_seqlen_k), bool(causal),
                                                     scale, left, right, softcap, be)
    return out


def attention_tree(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, parent: Tensor,
                   max_seqlen: int, *, scale: float | None = None, softcap: float = 0.0,
                   backend: str | None = None) -> Tensor:
    """Shared-prefix (tree) attention: packed segments that form a forest, each token attending to
    its ancestors' tokens and, causally, to its own segment.

    q [N, Hq, D]; k, v [N, Hkv, D] (GQA as ``attention``). ``cu_seqlens`` int32 [n + 1] cuts the N
    tokens into n segments (empty ones allowed); ``parent`` int32 [n]: parent[s] is the segment
    that s continues (−1 for a root), parent[s] < s, and the segments come in depth-first
    pre-order (the descendants of s are the segments right after it). ``max_seqlen``: a Python int
    ≥ the longest "ancestors ‖ s" length. A token of segment s attends to every token of every
    ancestor of s and to the tokens of s up to itself: equal, forward and backward, to
    ``attention_varlen`` on the sequences "ancestors ‖ s" (root first) of every s, with each
    token's output taken once and its k/v gradients summed over every sequence that holds it.
    A GRPO group is a prompt (root) with G completions (children): the prompt is computed once
    instead of G times. ``scale``, ``softcap`` as in ``attention``. Returns [N, Hq, D] like q.

    The tree's values are checked eagerly for CPU tensors (RLHF_OPS_DEBUG=1 for CUDA ones). The
    Triton kernels visit keys by loop bounds: a query block walks its ancestors (parent[] in the
    kernel) and its own segment's causal blocks; the dK/dV program of a key block walks the
    queries of its segment and the one contiguous token range of its descendants, so the
    backward is deterministic (no atomics) and needs no host-side metadata. The cuda backend does
    not implement it (the capability table refuses it).
    """
    _validate_qkv(OP_TREE, q, k, v, "NHD")
    _check_tree(cu_seqlens, parent, q, k, max_seqlen)
    scale = _scale_arg(OP_TREE, scale, q.shape[-1])
    softcap = _softcap_arg(OP_TREE, softcap)
    be = _backend.resolve(OP_TREE, backend, q.device)
    if be == "reference":
        return reference.attention_tree(q, k, v, cu_seqlens, parent, max_seqlen, scale, softcap)
    _check_backend_support(OP_TREE, be, q, parent.shape[0], None, True, softcap)
    out, _ = torch.ops.rlhf_ops.attention_tree_fwd(q, k, v, cu_seqlens, parent, int(max_seqlen),
                                                   scale, softcap, be)
    return out
