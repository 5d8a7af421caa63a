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

Capability, in one place: ``unavailable(backend, device)`` says why a backend cannot run on a
device at all; ``unsupported(op, backend, device, **inputs)`` adds the op's own limits (the
``LIMITS`` table: attention's head dims, dtypes, window, softcap and grid size per backend) and,
with ``exact=True``, the combinations that run but give wrong results (bf16 ``tl.dot`` under the
Triton interpreter). The ops enforce the limits; callers that take user models (the
integrations) also ask for ``exact``.

Internal API for the training CLI, the integrations, bench and tests (rather than the private
helpers below): ``check_name``, ``unavailable``, ``resolve``, ``unsupported`` / ``require`` and
``Refusal``, plus ``available_backends`` / ``use_backend`` (public).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from typing import Callable, NamedTuple

import torch

from . import _registry

BACKENDS = ("reference", "triton", "cuda")

# Order in which ``auto`` tries backends for CUDA tensors, per op: each op's ``auto`` in the op
# registry (rlhf_ops/_registry.py), where it is registered once.
AUTO_PREFERENCE = {op.name: op.auto for op in _registry.OPS}

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


def check_name(backend: str | None, what: str = "backend") -> str | None:
    """Validate a backend name a caller was given (None: no choice made); the ValueError names
    ``what`` and the choices."""
    return None if backend is None else _check_name(backend, what)


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
_C_cache_checked = False   # looked for a cached JIT build (needs the GPU architecture)
_C_jit_tried = False       # tried to compile it (once per process)


def load_extension(build: bool = False) -> bool:
    """Load the ``torch.ops.rlhf_ops_cuda`` ops once: ``rlhf_ops._C`` where it was built at
    install time, else the library ``rlhf_ops.build`` compiled on first use (or ahead of time)
    and cached. ``build=True`` (a ``backend="cuda"`` call on CUDA tensors) compiles a missing
    one now, on a machine with a GPU and nvcc; otherwise the cache is only looked at once the
    architecture is known without initialising CUDA (TORCH_CUDA_ARCH_LIST, or CUDA already up)."""
    global _C_loaded, _C_error, _C_cache_checked, _C_jit_tried
    if _C_loaded is None:
        try:
            importlib.import_module("rlhf_ops._C")
            _C_loaded = True
        except ImportError as e:
            _C_loaded = False
            _C_error = (f"rlhf_ops._C was not built at install time ({e}) and no build compiled on "
                        "first use is cached (python -m rlhf_ops.build compiles one)")
    if _C_loaded:
        return True
    if build and not _C_jit_tried:
        from . import build as jit
        _C_jit_tried = _C_cache_checked = True
        if not torch.cuda.is_available():
            _C_error = "rlhf_ops._C was not built at install time and no CUDA device is visible to compile it for"
            return False
        try:
            jit.load(compile=True)
            _C_loaded = True
        except jit.BuildError as e:
            _C_error = f"rlhf_ops._C was not built at install time and compiling it on first use failed: {e}"
    elif not _C_cache_checked and (os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_initialized()):
        from . import build as jit
        _C_cache_checked = True
        try:
            jit.load(compile=False)
            _C_loaded = True
        except jit.BuildError:
            pass
    return bool(_C_loaded)


def _cuda_problem(device_type: str) -> str | None:
    # the device first: for CPU tensors the reason does not depend on whether the extension is built
    if device_type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device_type} tensors"
    if not load_extension(build=True):
        return f"the CUDA extension is not available: {_C_error}"
    return None


load_extension()


def unavailable(backend: str, device) -> str | None:
    """None when ``backend`` can run on tensors of ``device`` (a torch.device or its type),
    else why it cannot. ``reference`` runs everywhere."""
    device_type = device.type if isinstance(device, torch.device) else str(device)
    if backend == "triton":
        return _triton_problem(device_type)
    if backend == "cuda":
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


def _preference(op: str) -> tuple[str, ...]:
    if op not in AUTO_PREFERENCE:
        raise KeyError(f"rlhf_ops: op {op!r} is not registered (rlhf_ops/_registry.py OPS): every "
                       f"op that resolves a backend needs an entry there")
    return AUTO_PREFERENCE[op]


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The concrete backend (reference/triton/cuda) that runs ``op`` on tensors on ``device``."""
    name = requested(backend)
    device_type = device.type
    if device_type == "meta":
        return "reference" if name == "auto" else name
    if name == "auto":
        prefs = _preference(op)
        if device_type != "cuda":
            return "reference"
        for cand in prefs:
            if unavailable(cand, device_type) is None:
                return cand
        return "reference"
    why = unavailable(name, device_type)
    if why is not None:
        raise RuntimeError(f"rlhf_ops.{op}: backend {name!r} is not available: {why}")
    return name


# ---------------------------------------------------------------------------------------------
# Capability: what a backend can run, beyond being available.
# ---------------------------------------------------------------------------------------------

CUDA_HEAD_DIMS = (64, 128)                          # the CUDA attention kernels' head dims
CUDA_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
GRID_LIMIT = 65535   # CUDA's limit on grid dims y and z: the fused kernels launch (tiles, heads, batch)


def triton_head_dim_ok(d: int) -> bool:
    # Mirrors kernels.attention.head_dim_supported without importing triton for other backends.
    return d % 16 == 0 and 16 <= d <= 256


class Refusal(NamedTuple):
    """Why a backend will not run these inputs: the exception type the op raises and the
    reason (without the ``rlhf_ops.<op>:`` prefix)."""
    error: type
    reason: str

    def exception(self, where: str) -> Exception:
        return self.error(f"{where}: {self.reason}")


class Limit(NamedTuple):
    """One row of ``LIMITS``: on ``backends``, inputs ``x`` for which ``refuses(x)`` holds raise
    ``error`` with ``reason(x)``. ``exact``: the backend runs them but the results are wrong
    (refused only when a caller asks for ``exact=True``)."""
    backends: tuple[str, ...]
    error: type
    refuses: Callable[[dict], bool]
    reason: Callable[[dict], str]
    exact: bool = False


def _cuda_window_refused(x) -> bool:
    w = x.get("window")
    return w is not None and (w[0] >= 0 or (w[1] >= 0 and not x.get("causal", True)))


def _batch_words(x) -> str:
    return ("a batch size (q.shape[0])" if x["op"] == "attention"
            else "a number of sequences (len(cu_seqlens) − 1)")


# Inputs the rules read (each optional; a rule whose inputs are not given does not apply):
# dtype, head_dim, n_batch (B or the number of sequences), n_heads (query heads), window (the
# caller's (left, right) or None), causal, softcap; op, backend and device_type are added.
_ATTENTION_LIMITS = (
    Limit(("triton", "cuda"), ValueError,
          lambda x: max(x["n_batch"], x["n_heads"]) > GRID_LIMIT,
          lambda x: f"the {x['backend']} backend supports {_batch_words(x)} and a number of query "
                    f"heads (q.shape[1]) of at most {GRID_LIMIT} each, got {x['n_batch']} and "
                    f"{x['n_heads']}; split the batch"),
    Limit(("triton",), ValueError, lambda x: not triton_head_dim_ok(x["head_dim"]),
          lambda x: f"the triton backend supports head dims (q.shape[-1]) that are multiples of "
                    f"16 from 16 to 256, got {x['head_dim']}"),
    Limit(("cuda",), ValueError, lambda x: x["head_dim"] not in CUDA_HEAD_DIMS,
          lambda x: f"the cuda backend supports head dims (q.shape[-1]) {CUDA_HEAD_DIMS}, got "
                    f"{x['head_dim']}"),
    Limit(("cuda",), TypeError, lambda x: x["dtype"] not in CUDA_ATTENTION_DTYPES,
          lambda x: f"the cuda backend supports q/k/v dtypes float16 and bfloat16, got "
                    f"{str(x['dtype']).replace('torch.', '')}"),
    Limit(("cuda",), ValueError, _cuda_window_refused,
          lambda x: f"the cuda backend does not support window (got {tuple(x['window'])}); use "
                    f"backend='triton' or 'reference'"),
    Limit(("cuda",), ValueError, lambda x: x["softcap"] > 0,
          lambda x: f"the cuda backend does not support softcap (got {x['softcap']}); use "
                    f"backend='triton' or 'reference'"),
    # the interpreter's tl.dot on bf16 operands is wrong (the attention kernels are dot-based)
    Limit(("triton",), TypeError,
          lambda x: x["device_type"] == "cpu" and x["dtype"] == torch.bfloat16,
          lambda x: "bfloat16 inputs on the Triton backend under the CPU interpreter "
                    "(TRITON_INTERPRET=1) are not supported: the interpreter computes tl.dot on "
                    "bf16 operands wrongly; use float32/float16 on the CPU or backend='reference'",
          exact=True),
)

# attention_tree: the cuda backend has no tree kernels; triton's limits (grid, head dims, the
# interpreter's bf16 tl.dot) as for attention
_TREE_LIMITS = (
    Limit(("cuda",), ValueError, lambda x: True,
          lambda x: "the cuda backend does not support attention_tree (shared-prefix tree "
                    "attention has Triton kernels only); use backend='triton' or 'reference'"),
) + tuple(limit for limit in _ATTENTION_LIMITS if limit.backends != ("cuda",))

# op -> its limits beyond availability (ops not named here run whatever their backends get)
LIMITS: dict[str, tuple[Limit, ...]] = {
    "attention": _ATTENTION_LIMITS,
    "attention_varlen": _ATTENTION_LIMITS,
    "attention_tree": _TREE_LIMITS,
}


def _needs(limit: Limit, x: dict) -> bool:
    """Whether every input the rule reads was given (reading a missing key raises KeyError)."""
    try:
        return bool(limit.refuses(x))
    except KeyError:
        return False


def unsupported(op: str, backend: str, device, *, exact: bool = False, **inputs) -> Refusal | None:
    """None when the concrete ``backend`` can run ``op`` on these inputs, else the ``Refusal``:
    first availability on the device (RuntimeError), then the op's ``LIMITS`` (with ``exact``
    also the rules whose results would be wrong). ``inputs``: see ``_ATTENTION_LIMITS``."""
    device_type = device.type if isinstance(device, torch.device) else str(device)
    if device_type != "meta":
        why = unavailable(backend, device_type)
        if why is not None:
            return Refusal(RuntimeError, f"backend {backend!r} is not available: {why}")
    x = dict(inputs, op=op, backend=backend, device_type=device_type)
    for limit in LIMITS.get(op, ()):
        if backend in limit.backends and (exact or not limit.exact) and _needs(limit, x):
            return Refusal(limit.error, limit.reason(x))
    return None


def require(op: str, backend: str | None, device, *, exact: bool = False, where: str | None = None,
            **inputs) -> str:
    """``resolve`` the backend for ``op``, then raise what ``unsupported`` refuses (the message
    starts with ``where``, default ``rlhf_ops.<op>``); returns the concrete backend."""
    be = resolve(op, backend, device if isinstance(device, torch.device) else torch.device(device))
    refusal = unsupported(op, be, device, exact=exact, **inputs)
    if refusal is not None:
        raise refusal.exception(where or f"rlhf_ops.{op}")
    return be


def debug_checks(device: torch.device) -> bool:
    """Whether value checks that need a host sync run: always for CPU, opt-in for CUDA."""
    return device.type == "cpu" or os.environ.get("RLHF_OPS_DEBUG", "0") == "1"


def triton_kernels(name: str):
    """Import ``rlhf_ops.kernels.<name>`` lazily (triton is imported on first use)."""
    return importlib.import_module(f"rlhf_ops.kernels.{name}")
