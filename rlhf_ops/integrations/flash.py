"""flash-attn's function signatures on top of ``rlhf_ops.attention`` / ``attention_varlen``.

    from rlhf_ops.integrations.flash import flash_attn_func, flash_attn_varlen_func
    out = flash_attn_func(q, k, v, causal=True)                       # q [B, T, H, D], k/v [B, S, Hkv, D]
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)   # q [Nq, H, D], k/v [Nk, Hkv, D]

Drop-in for code written against ``flash_attn`` 2.x (same argument names, order, defaults and
layouts; the output is laid out like q). The meaning of every option is flash-attn's:
``softmax_scale=None`` is 1/sqrt(D); ``causal`` is bottom-right aligned (query i of a sequence
with T queries and S keys sees keys j ≤ i + S − T); ``window_size=(left, right)`` keeps keys
i + S − T − left ≤ j ≤ i + S − T + right (−1 = unbounded); ``softcap > 0`` maps each score s to
softcap·tanh(s / softcap). GQA/MQA: H a multiple of Hkv. Unlike flash-attn, fp32 (and fp64)
inputs are accepted too, on every rlhf_ops backend; ``backend=`` picks one (default: the
``rlhf_ops.use_backend`` / ``RLHF_OPS_BACKEND`` choice).

Options that rlhf_ops cannot honour raise instead of being dropped: ``dropout_p > 0``,
``alibi_slopes``, ``return_attn_probs=True``, a paged ``block_table``. Extra keywords (``**ignored``,
e.g. flash-attn 3's ``seqused_q``) are accepted only when None, i.e. when they ask for nothing;
any other value raises. ``deterministic`` is accepted with either value: the backward of every
rlhf_ops backend is deterministic already (no atomics), which satisfies both.

On a CPU tensor with the Triton backend (the interpreter) bf16 is refused: the interpreter
computes ``tl.dot`` on bf16 operands wrongly. Use fp32/fp16 there, or the reference backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..attention import attention, attention_varlen

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _check_options(fn: str, dropout_p, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, extra: dict):
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or dropout_p != 0:
        raise ValueError(f"rlhf_ops.integrations.flash.{fn}: dropout_p={dropout_p!r} is not supported "
                         f"(attention dropout is not implemented); pass dropout_p=0.0, e.g. by setting "
                         f"the model's attention dropout to 0 or calling model.eval()")
    if not isinstance(deterministic, bool):
        raise TypeError(f"rlhf_ops.integrations.flash.{fn}: deterministic must be a bool, got "
                        f"{deterministic!r}")
    if return_attn_probs is not False:
        if return_attn_probs is True:
            raise ValueError(f"rlhf_ops.integrations.flash.{fn}: return_attn_probs=True is not "
                             f"supported: rlhf_ops never materialises the attention probabilities")
        raise TypeError(f"rlhf_ops.integrations.flash.{fn}: return_attn_probs must be a bool, "
                        f"got {return_attn_probs!r}")
    extra = dict(extra, alibi_slopes=alibi_slopes)
    for name, value in extra.items():
        if value is not None:
            what = {"alibi_slopes": "ALiBi biases are not implemented",
                    "block_table": "a paged KV cache is not implemented"}.get(
                name, "rlhf_ops accepts flash-attn's extra keywords only when they are None")
            raise ValueError(f"rlhf_ops.integrations.flash.{fn}: {name} is not supported ({what}); "
                             f"pass {name}=None or leave it out")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"rlhf_ops.integrations.flash.{fn}: window_size must be a pair (left, right) "
                        f"of ints (−1 = unbounded), got {window_size!r}")
    window = None if tuple(window_size) == (-1, -1) else (window_size[0], window_size[1])
    if softcap is None:
        softcap = 0.0
    return window, softcap


def _max_seqlen(fn: str, name: str, m) -> int:
    # flash-attn takes Python ints; a 0-d tensor is read on the host (one sync), as flash-attn would.
    if isinstance(m, torch.Tensor) and m.numel() == 1 and not m.is_floating_point():
        return int(m)
    if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)):    # SymInt: torch.compile
        raise TypeError(f"rlhf_ops.integrations.flash.{fn}: {name} must be an int (the longest "
                        f"sequence), got {type(m).__name__}")
    return m


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, backend: str | None = None,
                    **ignored) -> Tensor:
    """flash-attn's ``flash_attn_func``: q [B, T, H, D], k/v [B, S, Hkv, D] → out [B, T, H, D].

    Positional order as flash-attn 2.x. ``**ignored``: other keywords, accepted only when None
    (see the module docstring)."""
    fn = "flash_attn_func"
    window, softcap = _check_options(fn, dropout_p, window_size, softcap, alibi_slopes,
                                     deterministic, return_attn_probs, ignored)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"rlhf_ops.integrations.flash.{fn}: {name} must be a 4-D tensor "
                             f"{'[B, T, H, D]' if name == 'q' else '[B, S, Hkv, D]'}, got {got}")
    # the capability table, exact: also what runs but is wrong (bf16 tl.dot under the interpreter)
    _backend.require("attention", backend, q.device, exact=True,
                     where=f"rlhf_ops.integrations.flash.{fn}", dtype=q.dtype)
    # [B, T, H, D] → [B, H, T, D] views; the op takes any strides with a unit last stride.
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=bool(causal),
                    scale=softmax_scale, window=window, softcap=softcap, backend=backend)
    return out.transpose(1, 2)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None,
                           causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Tensor | None = None, *, backend: str | None = None,
                           **ignored) -> Tensor:
    """flash-attn's ``flash_attn_varlen_func``: q [Nq, H, D], k/v [Nk, Hkv, D] packed sequences,
    ``cu_seqlens_*`` int32 [n + 1] → out [Nq, H, D]. Each sequence attends only to itself.
    Positional order as flash-attn 2.x; ``block_table`` (paged KV cache) must be None."""
    fn = "flash_attn_varlen_func"
    window, softcap = _check_options(fn, dropout_p, window_size, softcap, alibi_slopes,
                                     deterministic, return_attn_probs,
                                     dict(ignored, block_table=block_table))
    if isinstance(q, torch.Tensor):
        _backend.require("attention_varlen", backend, q.device, exact=True,
                         where=f"rlhf_ops.integrations.flash.{fn}", dtype=q.dtype)
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                            _max_seqlen(fn, "max_seqlen_q", max_seqlen_q),
                            _max_seqlen(fn, "max_seqlen_k", max_seqlen_k), causal=bool(causal),
                            scale=softmax_scale, window=window, softcap=softcap, backend=backend)
