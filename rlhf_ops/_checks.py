"""Input validation shared by every op. Every message names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs (so gradcheck works), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
