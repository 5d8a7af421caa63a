"""Backend selection: which implementation of an op runs.

A backend is chosen, first match wins, by
  1. the op's ``backend=`` argument,
  2. the innermost ``rlhf_ops.use_backend(name)`` context,
  3. the environment variable ``RLHF_OPS_BACKEND``,
  4. ``"auto"``.

``auto`` picks ``reference`` for CPU tensors and, for CUDA tensors, the first available backend
in the op's preference list (``AUTO_PREFERENCE``). Naming a backend that cannot run the given
tensors is an error that says why; nothing falls back silently. ``meta`` tensors accept every
backend name: the op's fake implementation runs instead of a kernel.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading

import torch

BACKENDS = ("reference", "triton", "cuda")

# Order in which ``auto`` tries backends for CUDA tensors. Update from measured bench results
# (bench/results/<device>.json); until an op has been measured on a GPU, Triton comes first
# because it is the backend validated in CI under the interpreter.
AUTO_PREFERENCE = {
    "cross_entropy": ("triton", "cuda", "reference"),
    "linear_cross_entropy": ("triton", "cuda", "reference"),
    "attention": ("triton", "cuda", "reference"),
    "attention_varlen": ("triton", "cuda", "reference"),
    "pairwise_reward_loss": ("triton", "cuda", "reference"),
    "token_logprobs": ("triton", "cuda", "reference"),
    "linear_token_logprobs": ("triton", "cuda", "reference"),
    "kl_penalty": ("triton", "cuda", "reference"),
    "gae": ("triton", "cuda", "reference"),
}

_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of "
                         f"{', '.join(BACKENDS + ('auto',))}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (unless a call names its own)."""
    _check_name(name, "use_backend(name)")
    _stack().append(name)
    try:
        yield name
    finally:
        _stack().pop()


# ---------------------------------------------------------------------------------------------
# Availability. Each probe returns None when the backend can run, else the reason it cannot.
# ---------------------------------------------------------------------------------------------

def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Probed once at import so that torch.compile never traces an import.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_problem(device_type: str) -> str | None:
    if not _HAS_TRITON:  # pragma: no cover - triton ships with torch's CUDA wheels
        return "triton is not installed"
    if device_type == "cpu" and not triton_interpret():
        return ("the triton backend runs on CPU tensors only under the interpreter; "
                "set TRITON_INTERPRET=1 before importing rlhf_ops")
    if device_type == "cuda" and triton_interpret():
        return "TRITON_INTERPRET=1 is set, so triton runs kernels on the CPU, not on CUDA tensors"
    if device_type not in ("cpu", "cuda"):
        return f"the triton backend does not run on {device_type} tensors"
    return None


_C_loaded: bool | None = None
_C_error: str | None = None


def load_extension() -> bool:
    """Import ``rlhf_ops._C`` once; it registers the ``torch.ops.rlhf_ops_cuda`` ops."""
    global _C_loaded, _C_error
    if _C_loaded is None:
        try:
            importlib.import_module("rlhf_ops._C")
            _C_loaded = True
        except ImportError as e:
            _C_loaded, _C_error = False, str(e)
    return _C_loaded


def _cuda_problem(device_type: str) -> str | None:
    if not load_extension():
        return ("the CUDA extension rlhf_ops._C is not built (install with RLHF_OPS_BUILD_CUDA=1): "
                f"{_C_error}")
    if device_type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device_type} tensors"
    return None


load_extension()


def _problem(name: str, device_type: str) -> str | None:
    if name == "triton":
        return _triton_problem(device_type)
    if name == "cuda":
        return _cuda_problem(device_type)
    return None


def available_backends() -> list[str]:
    """Backends that can run on this machine (for CUDA tensors where a GPU exists, else CPU)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    out = ["reference"]
    if _triton_problem(device_type) is None:
        out.append("triton")
    if load_extension() and torch.cuda.is_available():
        out.append("cuda")
    return out


def requested(backend: str | None) -> str:
    if backend is not None:
        return _check_name(backend, "backend")
    if _stack():
        return _stack()[-1]
    return _check_name(os.environ.get("RLHF_OPS_BACKEND", "auto"), "RLHF_OPS_BACKEND")


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The concrete backend (reference/triton/cuda) that runs ``op`` on tensors on ``device``."""
    name = requested(backend)
    dtype = device.type
    if dtype == "meta":
        return "reference" if name == "auto" else name
    if name == "auto":
        if dtype != "cuda":
            return "reference"
        for cand in AUTO_PREFERENCE.get(op, ("reference",)):
            if _problem(cand, dtype) is None:
                return cand
        return "reference"
    why = _problem(name, dtype)
    if why is not None:
        raise RuntimeError(f"rlhf_ops.{op}: backend {name!r} is not available: {why}")
    return name


def debug_checks(device: torch.device) -> bool:
    """Whether value checks that need a host sync run: always for CPU, opt-in for CUDA."""
    return device.type == "cpu" or os.environ.get("RLHF_OPS_DEBUG", "0") == "1"


def triton_kernels(name: str):
    """Import ``rlhf_ops.kernels.<name>`` lazily (triton is imported on first use)."""
    return importlib.import_module(f"rlhf_ops.kernels.{name}")
