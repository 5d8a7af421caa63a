"""Attention ``softmax(q kᵀ · scale + mask) v`` (FlashAttention-2 style on the fused backends).

    out = rlhf_ops.attention(q, k, v, causal=True, scale=None, backend=None)
    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; Hq % Hkv == 0 (GQA, MQA at Hkv = 1); out like q.

Backends: ``reference`` runs the eager math of ``reference.attention`` in the input dtype;
``triton`` runs ``rlhf_ops.kernels.attention`` (any head dim that is a multiple of 16 up to 256;
fp16, bf16, fp32 — with TF32 matmuls on a GPU when ``torch.backends.cuda.matmul.allow_tf32`` is
set — and fp64, accumulated in fp64 so that ``gradcheck`` works); ``cuda`` runs
``torch.ops.rlhf_ops_cuda.attention_fwd/_bwd`` (head dims 64 and 128, fp16/bf16 only).
The fused backends never hold the T×S score matrix: forward saves only the output and one
log-sum-exp per query row (O(B·H·T) bytes beyond the inputs), backward recomputes the
probabilities block by block.

Causal alignment. ``causal=True`` is *bottom-right* aligned, as in flash-attn: query i sees key j
iff j ≤ i + S − T, i.e. the last query sees every key (the decoding / chunked-prefill convention).
``F.scaled_dot_product_attention(is_causal=True)`` is *top-left* aligned (j ≤ i). The two agree
when T == S and differ otherwise. When T > S the first T − S query rows see no key; they output
zeros (and give zero gradients); SDPA's top-left mask would let them attend.

Determinism. The Triton backward is deterministic: dK/dV are computed by one program per key block
(which loops over every query head of its GQA group and every query block), dQ by one program per
query block, with no atomics, so repeated runs give bitwise identical gradients for a given
block-size config (on a GPU the autotuner picks the config once per shape).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _checks, reference

OP = "attention"
CUDA_HEAD_DIMS = (64, 128)
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _triton_head_dim_ok(d: int) -> bool:
    # Mirrors kernels.attention.head_dim_supported without importing triton for other backends.
    return d % 16 == 0 and 16 <= d <= 256


def _unit_last(t: Tensor, backend: str) -> Tensor:
    """Triton takes any strides with unit stride over D (e.g. the transposed views of a QKV split);
    the CUDA ops take contiguous tensors."""
    if backend == "cuda":
        return t.contiguous()
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


# ------------------------------------------------------------------------------ custom ops ---

@torch.library.custom_op("rlhf_ops::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                  backend: str) -> tuple[Tensor, Tensor]:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] → (out [B, Hq, T, D] contiguous, lse): the triton
    backend's lse is [2, B, Hq, T], the base-2 pair (max, log2 Σ) per row; the cuda backend's is
    [B, Hq, T], the natural log-sum-exp. Each backend's backward reads its own."""
    q, k, v = (_unit_last(t, backend) for t in (q, k, v))
    if backend == "triton":
        return _backend.triton_kernels("attention").forward(q, k, v, causal, scale)
    return torch.ops.rlhf_ops_cuda.attention_fwd(q, k, v, causal, scale)


@attention_fwd.register_fake
def _(q, k, v, causal, scale, backend):
    B, Hq, T, D = q.shape
    lse_shape = (2, B, Hq, T) if backend == "triton" else (B, Hq, T)
    return q.new_empty((B, Hq, T, D)), q.new_empty(lse_shape, dtype=_checks.acc_dtype(q.dtype))


@torch.library.custom_op("rlhf_ops::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """→ (dq like q, dk like k, dv like v), new contiguous tensors."""
    dout, q, k, v, out = (_unit_last(t, backend) for t in (dout, q, k, v, out))
    if backend == "triton":
        return _backend.triton_kernels("attention").backward(dout, q, k, v, out, lse, causal, scale)
    return torch.ops.rlhf_ops_cuda.attention_bwd(dout, q, k, v, out, lse.contiguous(), causal, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (causal, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.rlhf_ops.attention_bwd(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API ---

def _validate(q: Tensor, k: Tensor, v: Tensor) -> None:
    _checks.floating(OP, "q", q, ndim=4)
    _checks.floating(OP, "k", k, ndim=4)
    _checks.floating(OP, "v", v, ndim=4)
    _checks.same_device(OP, "q", q, k=k, v=v)
    _checks.same_dtype(OP, "q", q, k=k, v=v)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"rlhf_ops.{OP}: k and v must have the same shape [B, Hkv, S, D], got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if D == 0:
        raise ValueError(f"rlhf_ops.{OP}: q/k/v head dim (shape[-1]) must be positive, got 0")
    if k.shape[0] != B:
        raise ValueError(f"rlhf_ops.{OP}: k/v batch size {k.shape[0]} differs from q's {B} "
                         f"(q [B, Hq, T, D] = {tuple(q.shape)}, k [B, Hkv, S, D] = {tuple(k.shape)})")
    if k.shape[3] != D:
        raise ValueError(f"rlhf_ops.{OP}: k/v head dim {k.shape[3]} differs from q's {D} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"rlhf_ops.{OP}: the number of query heads (q.shape[1] = {Hq}) must be a "
                         f"positive multiple of the number of key/value heads (k.shape[1] = {Hkv})")


GRID_LIMIT = 65535   # CUDA's limit on grid dims y and z: the fused kernels launch (tiles, heads, batch)


def _check_backend_support(be: str, q: Tensor) -> None:
    B, Hq, _, D = q.shape
    if be in ("triton", "cuda") and max(B, Hq) > GRID_LIMIT:
        raise ValueError(f"rlhf_ops.{OP}: the {be} backend supports a batch size (q.shape[0]) and a "
                         f"number of query heads (q.shape[1]) of at most {GRID_LIMIT} each, got "
                         f"{B} and {Hq}; split the batch")
    if be == "triton" and not _triton_head_dim_ok(D):
        raise ValueError(f"rlhf_ops.{OP}: the triton backend supports head dims (q.shape[-1]) that "
                         f"are multiples of 16 from 16 to 256, got {D}")
    if be == "cuda":
        if D not in CUDA_HEAD_DIMS:
            raise ValueError(f"rlhf_ops.{OP}: the cuda backend supports head dims (q.shape[-1]) "
                             f"{CUDA_HEAD_DIMS}, got {D}")
        if q.dtype not in CUDA_DTYPES:
            raise TypeError(f"rlhf_ops.{OP}: the cuda backend supports q/k/v dtypes float16 and "
                            f"bfloat16, got {str(q.dtype).replace('torch.', '')}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
              backend: str | None = None) -> Tensor:
    """Scaled dot-product attention, ``softmax(q kᵀ · scale + causal mask) v``.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA/MQA, k/v never repeated on
    the fused backends); ``scale=None`` means 1/sqrt(D). ``causal`` is bottom-right aligned when
    T != S (query i sees keys j ≤ i + S − T; rows that see no key output 0), unlike SDPA's
    top-left ``is_causal`` — see the module docstring. Differentiable in q, k and v; the Triton
    backward is deterministic.
    """
    _validate(q, k, v)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"rlhf_ops.{OP}: scale must be None or a finite number, got {scale!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    be = _backend.resolve(OP, backend, q.device)
    if be == "reference":
        return reference.attention(q, k, v, causal, scale)
    _check_backend_support(be, q)
    out, _ = torch.ops.rlhf_ops.attention_fwd(q, k, v, bool(causal), scale, be)
    return out
