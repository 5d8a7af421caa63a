"""Build rlhf_ops: a pure-Python wheel (py3-none-any) with the Triton kernels (as
``rlhf_ops.kernels``) and the CUDA sources (as ``rlhf_ops/csrc``, compiled on first use on a GPU
machine, see rlhf_ops/build.py). No compiler and no torch are needed to build or install it.

RLHF_OPS_BUILD_CUDA=1 also compiles the CUDA extension ``rlhf_ops._C`` at install time (then the
wheel is platform-specific); it builds against the installed torch, so it needs
``--no-build-isolation`` and nvcc:

    RLHF_OPS_BUILD_CUDA=1 pip install --no-build-isolation -e .

TORCH_CUDA_ARCH_LIST picks the architectures (default "8.0;9.0": A100 and H100/H200).
CUDA_HOME, when unset, is found by resolving the ``nvcc`` on PATH (which may be a wrapper script
that execs the real compiler); the CUDA headers that torch's wheels bring (the ``nvidia``
packages in site-packages) are added to the include path. Flags and toolchain discovery live in
rlhf_ops/build.py, shared with the build on first use.
"""
import glob
import importlib.util
import os
import sys

import setuptools
from setuptools import find_packages, setup

# pyproject.toml's `license = "Apache-2.0"` is PEP 639, which setuptools reads from 77 on; older
# ones (a fresh Python 3.11 venv has 65) fail on it with a schema dump. Say so in one line.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"rlhf_ops needs setuptools >= 77 (PEP 639 license metadata); this environment has "
             f"{setuptools.__version__}: pip install 'setuptools>=77', or drop --no-build-isolation")

ROOT = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_rlhf_ops_build", os.path.join(ROOT, "rlhf_ops", "build.py"))
jit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jit)


def _extensions():
    if os.environ.get("RLHF_OPS_BUILD_CUDA", "0") != "1":
        return [], {}
    cuda_home = jit.find_cuda_home()
    if cuda_home is None:
        sys.exit("RLHF_OPS_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
    try:
        import torch.utils.cpp_extension as ce
    except ImportError:
        sys.exit("RLHF_OPS_BUILD_CUDA=1 builds against the installed torch: install torch, then "
                 "pip install --no-build-isolation")
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", jit.DEFAULT_ARCHS)
    ce.CUDA_HOME = cuda_home  # torch resolved it at import time, possibly from the wrapper's dir
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    ext = ce.CUDAExtension(
        name="rlhf_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + jit.wheel_cuda_includes(),
        extra_compile_args={"cxx": jit.CXX_FLAGS, "nvcc": jit.NVCC_FLAGS},
    )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rlhf_ops", "rlhf_ops.*"]) + ["rlhf_ops.kernels", "rlhf_ops.csrc"],
    package_dir={"rlhf_ops.kernels": "kernels", "rlhf_ops.csrc": "csrc"},
    package_data={"rlhf_ops.csrc": ["*.cu", "*.cuh", "*.cpp", "*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
