"""Input validation shared by every op. Every message names the argument and what was expected."""
from __future__ import annotations

import numbers

import torch

from . import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
# masks: bool, float, or the integer attention masks tokenizers return (0 / 1)
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8,
                                              torch.uint8)


def tensor(op: str, name: str, t, *, dtypes=None, ndim=None, min_ndim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rlhf_ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"rlhf_ops.{op}: {name} must have dtype in ({names}), got "
                        f"{str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"rlhf_ops.{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"rlhf_ops.{op}: {name} must have at least {min_ndim} dimension(s), "
                         f"got shape {tuple(t.shape)}")
    return t


def floating(op: str, name: str, t, **kw) -> torch.Tensor:
    return tensor(op, name, t, dtypes=FLOAT_DTYPES, **kw)


def index(op: str, name: str, t, **kw) -> torch.Tensor:
    return tensor(op, name, t, dtypes=(torch.int64,), **kw)


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"rlhf_ops.{op}: {name} is on {t.device} but {ref_name} is on "
                             f"{ref.device}; all inputs must be on one device")


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"rlhf_ops.{op}: {name} has dtype {t.dtype} but {ref_name} has "
                            f"{ref.dtype}; they must match")


def shape(op: str, name: str, t: torch.Tensor, expected, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"rlhf_ops.{op}: {name} must have shape {what} = {tuple(expected)}, "
                         f"got {tuple(t.shape)}")


def reduction(op: str, value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"rlhf_ops.{op}: reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def in_range(op: str, name: str, t: torch.Tensor, low: int, high: int, *, ignore=None) -> None:
    """Eager value check (host sync): every element of ``t`` (but ``ignore``) in [low, high)."""
    if t.numel() == 0:
        return
    bad = (t < low) | (t >= high)
    if ignore is not None:
        bad &= t != ignore
    if bool(bad.any()):
        v = int(t[bad][0])
        extra = f" or {ignore}" if ignore is not None else ""
        raise ValueError(f"rlhf_ops.{op}: {name} holds {v}, out of range [{low}, {high}){extra}")


def eager_in_range(op: str, name: str, t: torch.Tensor, low: int, high: int, *, ignore=None) -> None:
    """``in_range`` before the reference backend runs. The fused backends check inside their
    custom op; eager indexing would fail with an error that does not name the argument. Not
    while torch.compile traces (a value check is a host sync), and on CUDA tensors only with
    RLHF_OPS_DEBUG=1."""
    if _backend.debug_checks(t.device) and not torch.compiler.is_compiling():
        in_range(op, name, t, low, high, ignore=ignore)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs (so gradcheck works), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------ option arguments ---

def flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"rlhf_ops.{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def temperature(op: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: temperature must be a number, got {type(value).__name__}")
    if not 0.0 < float(value) < float("inf"):
        raise ValueError(f"rlhf_ops.{op}: temperature must be a finite number > 0, got {value}")
    return float(value)


def softcap(op: str, value) -> float:
    """A logit softcap c (x → c·tanh(x/c)): a finite number ≥ 0, 0 = off."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: softcap must be a finite number ≥ 0 (0 = off), got "
                        f"{type(value).__name__}")
    if not 0.0 <= float(value) < float("inf"):
        raise ValueError(f"rlhf_ops.{op}: softcap must be a finite number ≥ 0 (0 = off), got {value}")
    return float(value)


def beta(op: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"rlhf_ops.{op}: beta must be a number, got {type(value).__name__}")
    if not abs(float(value)) < float("inf"):
        raise ValueError(f"rlhf_ops.{op}: beta must be finite, got {value}")
    return float(value)


def choice(op: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"rlhf_ops.{op}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def label_smoothing(op: str, value) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"rlhf_ops.{op}: label_smoothing must be in [0, 1], got {value}")
    return float(value)


def ignore_index(op: str, value) -> int:
    if not isinstance(value, int):
        raise TypeError(f"rlhf_ops.{op}: ignore_index must be an int, got {type(value).__name__}")
    return value


def mask(op: str, m, expected, what: str) -> None:
    """An optional mask (bool, float or integer) of shape ``expected``."""
    if m is not None:
        tensor(op, "mask", m, dtypes=MASK_DTYPES)
        shape(op, "mask", m, expected, what)


def tokens(op: str, t: torch.Tensor, lead, what: str, multi_ok: bool) -> bool:
    """tokens [*lead] (one per position) or, when ``multi_ok``, [*lead, K] — the K form is
    recognised by tokens.dim() == len(lead) + 1 (the dimension count of the logits / hidden).
    Returns whether tokens are [..., K]."""
    lead = tuple(lead)
    multi = multi_ok and t.dim() == len(lead) + 1
    if multi and tuple(t.shape[:-1]) == lead:
        return True
    if tuple(t.shape) == lead:
        return False
    want = f"{what} = {lead}" + (f" or {what} + (K,) = {lead + ('K',)}" if multi_ok else "")
    raise ValueError(f"rlhf_ops.{op}: tokens must have shape {want}, got {tuple(t.shape)}")
