"""Compile-and-link check of some csrc/*.cu files without reinstalling the package.

    python .ci/check_cuda.py csrc/reward.cu [more.cu ...]

Builds the files (with csrc/ on the include path, the flags of rlhf_ops/build.py) into a throwaway
shared library, loads it with torch.ops.load_library, and lists the torch.ops.rlhf_ops_cuda ops
it registered. Needs no GPU. Used by developers; CI builds the whole extension through setup.py.
"""
import importlib.util
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(files):
    # the flags and toolchain discovery of both builds live in rlhf_ops/build.py (no package import)
    spec = importlib.util.spec_from_file_location("_build", os.path.join(ROOT, "rlhf_ops", "build.py"))
    jit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jit)
    cuda_home = jit.find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", jit.DEFAULT_ARCHS)
    import torch
    import torch.utils.cpp_extension as ce
    ce.CUDA_HOME = cuda_home
    build = tempfile.mkdtemp(prefix="rlhf_cuda_check_")
    name = "rlhf_check_" + "_".join(os.path.splitext(os.path.basename(f))[0] for f in files)
    ce.load(name=name, sources=[os.path.abspath(f) for f in files], build_directory=build,
            extra_include_paths=[os.path.join(ROOT, "csrc")] + jit.wheel_cuda_includes(),
            extra_cflags=jit.CXX_FLAGS, extra_cuda_cflags=jit.NVCC_FLAGS,
            is_python_module=False, verbose=False)
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rlhf_ops_cuda::")]
    print("built and loaded; torch.ops.rlhf_ops_cuda has:", ", ".join(sorted(ops)))


if __name__ == "__main__":
    main(sys.argv[1:])
