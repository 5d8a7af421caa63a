"""Build rlhf_ops: the Python package, the Triton kernels (as ``rlhf_ops.kernels``) and, when
asked for, the CUDA extension ``rlhf_ops._C`` compiled from ``csrc/``.

RLHF_OPS_BUILD_CUDA=1 builds the extension, =0 skips it; unset, it is built when a GPU is visible.
TORCH_CUDA_ARCH_LIST picks the architectures (default "8.0;9.0": A100 and H100/H200).
CUDA_HOME, when unset, is found by resolving the ``nvcc`` on PATH (which may be a wrapper script
that execs the real compiler); the CUDA headers that torch's wheels bring (the ``nvidia``
packages in site-packages) are added to the include path.

Install:  pip install --no-build-isolation -e .
"""
import glob
import importlib.util
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("RLHF_OPS_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


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


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True):
            nvcc = cand
            break
    if nvcc is None:
        return None
    return os.path.dirname(os.path.dirname(_real_nvcc(nvcc)))


def _wheel_cuda_includes() -> list[str]:
    """Include dirs of the NVIDIA wheels installed beside torch (nvidia/cu13/include, ...)."""
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations if spec else []) or []:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extensions():
    if not _want_cuda():
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        sys.exit("RLHF_OPS_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch.utils.cpp_extension as ce
    ce.CUDA_HOME = cuda_home  # torch resolved it at import time, possibly from the wrapper's dir
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    ext = ce.CUDAExtension(
        name="rlhf_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _wheel_cuda_includes(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                     "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_HALF2_OPERATORS__"],
        },
    )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rlhf_ops", "rlhf_ops.*"]) + ["rlhf_ops.kernels"],
    package_dir={"rlhf_ops.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
