"""The CUDA extension (``torch.ops.rlhf_ops_cuda``): compiled on first use, or ahead of time.

rlhf_ops installs as a pure-Python wheel; the CUDA sources (``csrc/``) travel inside it. The
extension reaches a process in one of two ways:

1. built at install time into ``rlhf_ops._C`` (``RLHF_OPS_BUILD_CUDA=1 pip install
   --no-build-isolation .``; setup.py takes its flags from this file), or
2. compiled on first use: the first ``backend="cuda"`` call on CUDA tensors compiles ``csrc/``
   with ``torch.utils.cpp_extension`` and ninja for the visible GPUs' architectures, into a cache
   directory keyed by the torch version, the CUDA version, the architectures, the Python version
   and a hash of the sources and flags; later processes load the cached library (no compiler
   needed). ``python -m rlhf_ops.build`` does the same ahead of time.

Several ranks starting at once: the build runs under an exclusive ``flock`` on the cache
directory, so one process compiles while the others wait and then load its result. A build
killed half-way leaves no lock behind (the kernel drops a dead process's flock; torch's own lock
file, which older torch versions do leave behind, is removed under ours).

Without a CUDA compiler (nvcc), or ninja, or a GPU and no architecture named, the build stops
with a one-line ``BuildError`` that says which, and the cuda backend reports it.

    python -m rlhf_ops.build                 # for the visible GPUs
    python -m rlhf_ops.build --arch 9.0      # for sm_90, also on a machine without a GPU
    python -m rlhf_ops.build --print-dir     # where the cache for this machine lives

Environment: RLHF_OPS_CACHE_DIR (default $XDG_CACHE_HOME/rlhf_ops or ~/.cache/rlhf_ops),
TORCH_CUDA_ARCH_LIST (architectures, e.g. "9.0" or "8.0;9.0"), CUDA_HOME, MAX_JOBS.

This module imports nothing from rlhf_ops and torch only inside functions: setup.py loads it by
path, in an environment that may have no torch.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import time

LIB_NAME = "rlhf_ops_cuda"            # the JIT library: <cache dir>/rlhf_ops_cuda.so
_DONE = "build-ok"                    # written after a successful build, read before loading

# Compiler flags of both builds (install time and first use).
CXX_FLAGS = ["-O3", "-std=c++20"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
DEFAULT_ARCHS = "8.0;9.0"             # the install-time build's default (A100, H100/H200)


class BuildError(RuntimeError):
    """The CUDA extension cannot be built or loaded here; the message is one line."""


# ------------------------------------------------------------------ finding the toolchain ---

def _real_nvcc(path: str) -> str:
    """Follow symlinks and ``exec /path/to/nvcc "$@"`` wrapper scripts to the real nvcc."""
    for _ in range(8):
        path = os.path.realpath(path)
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            return path
        if not head.startswith(b"#!"):
            return path
        m = re.search(rb"exec\s+[\"']?([^\s\"']*nvcc)[\"']?", head)
        if not m:
            return path
        path = m.group(1).decode()
    return path


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit of the ``nvcc`` on PATH (or /usr/local/cuda*)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if os.path.exists(os.path.join(env, "bin", "nvcc")) else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        found = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
        nvcc = found[0] if found else None
    if nvcc is None:
        return None
    return os.path.dirname(os.path.dirname(_real_nvcc(nvcc)))


def wheel_cuda_includes() -> list[str]:
    """Include dirs of the NVIDIA wheels installed beside torch (nvidia/cu13/include, ...)."""
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations if spec else []) or []:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def source_dir() -> str:
    """``csrc/``: inside the installed package (wheel), else beside it (source checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if glob.glob(os.path.join(cand, "*.cu")):
            return cand
    raise BuildError(f"the CUDA sources (csrc/*.cu) are not found beside {here}")


def sources(src: str | None = None) -> list[str]:
    src = src or source_dir()
    return sorted(glob.glob(os.path.join(src, "*.cpp"))) + sorted(glob.glob(os.path.join(src, "*.cu")))


# ------------------------------------------------------------------------ the cache ---

def arch_list(archs: str | None = None) -> list[str]:
    """Architectures to build for: ``archs`` ("9.0" or "8.0;9.0"), else TORCH_CUDA_ARCH_LIST,
    else the visible GPUs' compute capabilities (this initialises CUDA)."""
    archs = archs or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return sorted({a.strip() for a in re.split(r"[;, ]+", archs) if a.strip()})
    import torch
    if not torch.cuda.is_available():
        raise BuildError("no CUDA device is visible and no architecture was named "
                         "(python -m rlhf_ops.build --arch 9.0, or TORCH_CUDA_ARCH_LIST)")
    return sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def cache_root() -> str:
    root = os.environ.get("RLHF_OPS_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rlhf_ops")
    return root


def build_dir(archs: list[str], root: str | None = None) -> str:
    """<root>/torch<ver>-cu<ver>-sm<archs>-py<ver>-<hash of sources and flags>."""
    import torch
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(source_dir(), "*"))):
        if path.endswith((".cu", ".cuh", ".cpp", ".h")):
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(repr((CXX_FLAGS, NVCC_FLAGS)).encode())
    key = "torch{}-cu{}-sm{}-py{}{}-{}".format(
        torch.__version__.split("+")[0], torch.version.cuda or "none",
        "_".join(a.replace(".", "") for a in archs), *sys.version_info[:2], h.hexdigest()[:12])
    return os.path.join(root or cache_root(), key)


@contextlib.contextmanager
def _locked(directory: str):
    """Exclusive advisory lock on ``directory``; the kernel releases it if the holder dies."""
    import fcntl
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".rlhf_ops.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------ build and load ---

def _compile(directory: str, archs: list[str], verbose: bool) -> None:
    """Compile csrc/ into <directory>/rlhf_ops_cuda.so with torch.utils.cpp_extension + ninja
    (which also loads it into this process)."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise BuildError("no CUDA compiler: nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        raise BuildError("ninja is not installed (pip install ninja)")
    print(f"rlhf_ops: compiling the CUDA extension for sm {' '.join(archs)} (first use; cached in "
          f"{directory})", file=sys.stderr, flush=True)
    os.environ["CUDA_HOME"] = cuda_home        # before torch.utils.cpp_extension looks for it
    import torch.utils.cpp_extension as ce
    ce.CUDA_HOME = cuda_home   # torch resolved it at import time, possibly from a wrapper's dir
    stale = os.path.join(directory, "lock")  # torch's own lock file: only a dead build leaves it
    if os.path.exists(stale):
        os.remove(stale)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    t0 = time.time()
    try:
        ce.load(name=LIB_NAME, sources=sources(), build_directory=directory,
                extra_include_paths=[source_dir()] + wheel_cuda_includes(),
                extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
                is_python_module=False, verbose=verbose)
    except Exception as e:  # noqa: BLE001 - the compiler's output goes to a log, the error is one line
        log = os.path.join(directory, "build-error.log")
        with open(log, "w") as f:
            f.write(str(e))
        first = next((ln for ln in str(e).splitlines() if "error" in ln.lower()), str(e).splitlines()[0] if str(e) else "")
        raise BuildError(f"compiling the CUDA extension failed ({first.strip()[:200]}); full log: {log}") from None
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    with open(os.path.join(directory, _DONE), "w") as f:
        f.write(f"built in {time.time() - t0:.0f} s for sm {' '.join(archs)}\n")


def library_path(archs: list[str], root: str | None = None) -> str:
    return os.path.join(build_dir(archs, root), LIB_NAME + ".so")


def load(compile: bool = True, archs: str | None = None, root: str | None = None,
         verbose: bool = False) -> str:
    """Load the JIT-built library into this process, compiling it first when it is not cached
    and ``compile`` is true. Returns the library's path; raises BuildError (one line)."""
    import torch
    arch = arch_list(archs)
    directory = build_dir(arch, root)
    lib = os.path.join(directory, LIB_NAME + ".so")
    done = os.path.join(directory, _DONE)
    if os.path.exists(done) and os.path.exists(lib):   # cached: no lock, no compiler needed
        torch.ops.load_library(lib)
        return lib
    if not compile:
        raise BuildError(f"not built for sm {' '.join(arch)} yet (python -m rlhf_ops.build compiles it)")
    with _locked(directory):
        if os.path.exists(done) and os.path.exists(lib):   # another rank built it while we waited
            torch.ops.load_library(lib)
        else:
            _compile(directory, arch, verbose)
    return lib


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf_ops.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", help='architectures, e.g. "9.0" or "8.0;9.0" (default: the visible GPUs)')
    p.add_argument("--cache-dir", help="cache root (default: RLHF_OPS_CACHE_DIR or ~/.cache/rlhf_ops)")
    p.add_argument("--print-dir", action="store_true", help="print the build directory and exit")
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = p.parse_args(argv)
    try:
        if args.print_dir:
            print(build_dir(arch_list(args.arch), args.cache_dir))
            return 0
        if "rlhf_ops._C" in sys.modules:   # `python -m rlhf_ops.build` imported the package
            print("rlhf_ops._C (built at install time) is loaded: the cuda backend needs no JIT build")
            return 0
        t0 = time.time()
        lib = load(compile=True, archs=args.arch, root=args.cache_dir, verbose=args.verbose)
    except BuildError as e:
        print(f"rlhf_ops.build: {e}", file=sys.stderr)
        return 1
    import torch
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("rlhf_ops_cuda::"))
    print(f"{lib} ({time.time() - t0:.0f} s): torch.ops.rlhf_ops_cuda has {len(ops)} ops: {', '.join(ops)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
