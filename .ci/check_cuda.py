"""Compile-and-link check of some csrc/*.cu files without reinstalling the package.

    python .ci/check_cuda.py csrc/reward.cu [more.cu ...]

Builds the files (with csrc/ on the include path, the same flags as setup.py) into a throwaway
shared library, loads it with torch.ops.load_library, and lists the torch.ops.rlhf_ops_cuda ops
it registered. Needs no GPU. Used by developers; CI builds the whole extension through setup.py.
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(files):
    # setup.py calls setup() at import; read its helpers without running it.
    src = open(os.path.join(ROOT, "setup.py")).read().split("ext_modules, cmdclass =")[0]
    ns = {"__file__": os.path.join(ROOT, "setup.py")}
    exec(compile(src, "setup.py", "exec"), ns)
    cuda_home = ns["_find_cuda_home"]()
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch
    import torch.utils.cpp_extension as ce
    ce.CUDA_HOME = cuda_home
    build = tempfile.mkdtemp(prefix="rlhf_cuda_check_")
    name = "rlhf_check_" + "_".join(os.path.splitext(os.path.basename(f))[0] for f in files)
    ce.load(name=name, sources=[os.path.abspath(f) for f in files], build_directory=build,
            extra_include_paths=[os.path.join(ROOT, "csrc")] + ns["_wheel_cuda_includes"](),
            extra_cflags=["-O3", "-std=c++20"],
            extra_cuda_cflags=["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr",
                               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                               "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"],
            is_python_module=False, verbose=False)
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rlhf_ops_cuda::")]
    print("built and loaded; torch.ops.rlhf_ops_cuda has:", ", ".join(sorted(ops)))


if __name__ == "__main__":
    main(sys.argv[1:])
