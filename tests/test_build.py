"""Packaging and the CUDA extension's build on first use (rlhf_ops/build.py, setup.py).

* ``pip wheel`` gives a pure-Python wheel (py3-none-any) with nvcc hidden: the CUDA sources travel
  inside it, no compiler or torch is needed to build or install it.
* A setuptools too old for pyproject.toml's PEP 639 license gets a one-line message, not a schema
  dump.
* rlhf_ops.build: several processes ("ranks") starting at once compile once and all load that
  build (a flock); without a CUDA compiler the build, the CLI and the cuda backend each say so in
  one line; the first ``backend="cuda"`` use on a GPU machine compiles, a CPU-only one never does.
* ``test_jit_build_compiles_for_sm90`` really compiles csrc/ with nvcc for sm_90 into a temporary
  cache and loads it in a fresh process (minutes on a 2-core machine: marked ``jit_build``; CI runs
  it once, in the venv with the GPU image's torch, and deselects it in the main suite, whose
  install-time build already compiles the same sources).
Every build runs in a subprocess that loads rlhf_ops/build.py by path, so the extension this
process may have loaded (rlhf_ops._C) does not collide with the library under test.
"""
import glob
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PY = os.path.join(ROOT, "rlhf_ops", "build.py")
OPS = ["attention_bwd", "attention_fwd", "attention_varlen_bwd", "attention_varlen_fwd",
       "cross_entropy_bwd", "cross_entropy_fwd", "kl_bwd", "kl_fwd", "pairwise_reward_fwd"]


def _env(**extra):
    """This interpreter's environment with nvcc off PATH (the venv's bin and the system's only)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "RLHF_OPS_BUILD_CUDA",
                                                          "TORCH_CUDA_ARCH_LIST")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])
    env.update(extra)
    return env


def _run_build_py(code, env, timeout=120):
    """Run ``code`` in a fresh interpreter with rlhf_ops/build.py loaded by path as ``b``."""
    prelude = (f"import importlib.util, sys\nspec = importlib.util.spec_from_file_location('b', {BUILD_PY!r})\n"
               "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ packaging ---

def test_wheel_is_pure_python_without_nvcc(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    for d in ("rlhf_ops", "kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, d), src / d,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    assert shutil.which("nvcc", path=_env()["PATH"]) is None
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "out"), "."], cwd=src, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "out" / "*.whl"))
    assert wheel.endswith("-py3-none-any.whl"), wheel
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("rlhf_ops/build.py", "rlhf_ops/kernels/attention.py", "rlhf_ops/csrc/attention.cu",
              "rlhf_ops/csrc/common.cuh", "rlhf_ops/csrc/module.cpp"):
        assert f in names, f
    assert not [n for n in names if n.endswith(".so")], names


def test_old_setuptools_gets_one_line(tmp_path):
    # a stand-in setuptools 65 (what a fresh Python 3.11 venv has) ahead of the real one
    fake = tmp_path / "setuptools"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '65.5.0'\n"
                                      "def setup(**kw): raise SystemExit('setup() reached')\n"
                                      "def find_packages(**kw): return []\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "--version"], cwd=ROOT,
                          env=_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "setuptools >= 77" in lines[0] and "65.5.0" in lines[0], proc.stderr


# -------------------------------------------------------------------- the build on first use ---

def test_concurrent_ranks_compile_once(tmp_path):
    """Four processes ask for the same build at once: one compiles (a stand-in that takes a
    second), the others wait on the lock and load its result."""
    code = f"""
        import os, time, torch
        loaded = []
        torch.ops.load_library = loaded.append
        def fake_compile(directory, archs, verbose):
            with open({str(tmp_path / "compiles")!r}, "a") as f:
                f.write(str(os.getpid()) + "\\n")
            time.sleep(1.0)
            open(os.path.join(directory, b.LIB_NAME + ".so"), "w").close()
            open(os.path.join(directory, b._DONE), "w").close()
        b._compile = fake_compile
        lib = b.load(compile=True, archs="9.0", root={str(tmp_path / "cache")!r})
        print("LIB", lib, "LOADED", len(loaded))
    """
    procs = [subprocess.Popen([sys.executable, "-c", (
        f"import importlib.util, sys\nspec = importlib.util.spec_from_file_location('b', {BUILD_PY!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n") + textwrap.dedent(code)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len((tmp_path / "compiles").read_text().split()) == 1
    libs = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("LIB")}
    assert len(libs) == 1 and libs.pop().endswith("rlhf_ops_cuda.so")
    # the compiling process loaded it through torch's builder (stubbed here), the others directly
    assert sorted(int(out.split("LOADED")[1]) for out, _ in outs) == [0, 1, 1, 1]


def test_no_compiler_is_one_line(tmp_path):
    env = _env(CUDA_HOME=str(tmp_path / "no-cuda"))   # a CUDA_HOME without nvcc: nothing to compile with
    proc = subprocess.run([sys.executable, BUILD_PY, "--arch", "9.0", "--cache-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln and ln.strip()]
    assert lines == ["rlhf_ops.build: no CUDA compiler: nvcc was not found (set CUDA_HOME or put nvcc "
                     "on PATH)"], proc.stderr
    # without a GPU and without an architecture named, it says that instead of guessing
    proc = subprocess.run([sys.executable, BUILD_PY, "--cache-dir", str(tmp_path)],
                          env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device is visible and no architecture was named" in proc.stderr


def test_cuda_backend_compiles_on_first_use_only_with_a_gpu(monkeypatch):
    """_backend.load_extension(build=True) — what the first backend="cuda" call on CUDA tensors
    runs — compiles through rlhf_ops.build where a GPU is visible and reports its failure in one
    line; without a GPU it never compiles."""
    from rlhf_ops import _backend, build

    calls = []

    def fake_load(compile=True, **kw):
        calls.append(compile)
        raise build.BuildError("no CUDA compiler: nvcc was not found (set CUDA_HOME or put nvcc on PATH)")

    monkeypatch.setattr(build, "load", fake_load)
    for name, value in (("_C_loaded", False), ("_C_jit_tried", False), ("_C_cache_checked", True)):
        monkeypatch.setattr(_backend, name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _backend.load_extension(build=True) is False and calls == []
    assert "no CUDA device is visible" in _backend._C_error

    monkeypatch.setattr(_backend, "_C_jit_tried", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    why = _backend._cuda_problem("cuda")
    assert calls == [True] and "\n" not in why
    assert why.startswith("the CUDA extension is not available: rlhf_ops._C was not built at install time "
                          "and compiling it on first use failed: no CUDA compiler: nvcc was not found")
    assert _backend._cuda_problem("cuda") == why and calls == [True]   # tried once per process


@pytest.mark.jit_build
def test_jit_build_compiles_for_sm90(tmp_path):
    """The real thing: nvcc compiles csrc/ for sm_90 into a temporary cache, the library registers
    every op with a CUDA kernel; a second process with no compiler at all loads the cached build."""
    from rlhf_ops import build

    if build.find_cuda_home() is None:
        pytest.skip("no CUDA compiler (nvcc) on this machine")
    cache = str(tmp_path / "cache")
    code = f"""
        import torch
        lib = b.load(compile=True, archs="9.0", root={cache!r})
        names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                       if n.startswith("rlhf_ops_cuda::"))
        print("LIB", lib)
        print("OPS", " ".join(n for n in names
                              if torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_ops_cuda::" + n, "CUDA")))
    """
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env.setdefault("MAX_JOBS", "2")
    proc = _run_build_py(code, env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lib = proc.stdout.split("LIB ")[1].split()[0]
    assert os.path.exists(lib) and "-sm90-" in lib
    assert set(OPS) <= set(proc.stdout.split("OPS ")[1].split()), proc.stdout
    # cached: a process without nvcc (CUDA_HOME pointing nowhere, PATH without it) just loads it
    proc = _run_build_py(code.replace("compile=True", "compile=False"),
                         _env(CUDA_HOME=str(tmp_path / "no-cuda")), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("LIB ")[1].split()[0] == lib
    assert set(OPS) <= set(proc.stdout.split("OPS ")[1].split())
