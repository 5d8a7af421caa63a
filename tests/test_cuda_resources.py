"""GPU resources of every kernel in the built CUDA extension, read offline from its cubins (no GPU,
no recompilation): per kernel and architecture, registers, stack frame, local memory and static
shared memory (``cuobjdump --dump-resource-usage``) and the launch bounds (``cuobjdump -elf``,
attribute EIATTR_MAX_THREADS).

Fails on any local memory use (a stack frame is where ptxas puts spilled registers; local arrays
would land there too, which these kernels must not have either) and on more registers than the
launch bounds allow. A kernel at the edge of spilling shows up here the day a change pushes it
over, not as a silent slowdown on the GPU.

Skipped, naming why, only when the extension is not built or no ``cuobjdump`` is found (CUDA
toolkit ``bin/`` or the copy that Triton's NVIDIA backend ships). ``python tests/test_cuda_resources.py``
prints the table.
"""
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

ARCHS = ("sm_80", "sm_90")
REGS_PER_SM = 65536        # sm_80 and sm_90: 64 K 32-bit registers per SM (and per block)
MAX_REGS_PER_THREAD = 255
STATIC_SMEM_LIMIT = 48 * 1024

# Every instantiation csrc/attention.cu must hold, per architecture (dtype × head dim).
ATTENTION_KERNELS = sorted(
    [f"{k}<{t}, {d}>" for k in ("attn_fwd_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel")
     for t in ("__half", "__nv_bfloat16") for d in (64, 128)]
    + [f"attn_bwd_delta_kernel<{t}>" for t in ("__half", "__nv_bfloat16")])


def _extension_path():
    try:
        spec = importlib.util.find_spec("rlhf_ops._C")
    except ImportError:
        spec = None
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def _cuobjdump():
    cands = [shutil.which("cuobjdump")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "bin", "cuobjdump"))
    cands += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"), reverse=True)
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _demangle(names):
    """Mangled → readable (c++filt when present); then the anonymous namespace and the parameter
    list are dropped: rlhf::attn_fwd_kernel<__half, 64>."""
    out = dict(zip(names, names))
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=30)
        lines = res.stdout.splitlines()
        if res.returncode == 0 and len(lines) == len(names):
            out = dict(zip(names, lines))
    short = {}
    for m, d in out.items():
        d = re.sub(r"\(anonymous namespace\)::", "", d)
        d = re.sub(r"^void ", "", d)
        depth, cut = 0, len(d)
        for i, ch in enumerate(d):  # drop the trailing parameter list "(...)" at template depth 0
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        short[m] = d[:cut].replace("rlhf::", "")
    return short


@functools.lru_cache(maxsize=1)
def resources():
    """[{arch, source, kernel, mangled, regs, stack, local, shared, max_threads}] or a skip reason."""
    so = _extension_path()
    if so is None:
        return "the CUDA extension rlhf_ops._C is not built (RLHF_OPS_BUILD_CUDA=1 builds it)"
    tool = _cuobjdump()
    if tool is None:
        return "no cuobjdump found (CUDA toolkit bin/ or triton/backends/nvidia/bin/)"

    def run(*args):
        res = subprocess.run([tool, *args, so], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {res.stderr[-2000:]}")
        return res.stdout

    rows, arch, source = [], None, None
    for line in run("--dump-resource-usage").splitlines():
        line = line.strip()
        if line.startswith("arch ="):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("identifier ="):
            source = os.path.basename(line.split("=", 1)[1].strip())
        elif line.startswith("Function "):
            rows.append({"arch": arch, "source": source, "mangled": line[len("Function "):].rstrip(":")})
        elif line.startswith("REG:") and rows:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows[-1].update(regs=int(fields["REG"]), stack=int(fields["STACK"]),
                            local=int(fields["LOCAL"]), shared=int(fields["SHARED"]))

    # Launch bounds: EIATTR_MAX_THREADS "x y z" in the .nv.info.<kernel> section of each ELF.
    bounds, arch, func, want = {}, None, None, False
    for line in run("-elf").splitlines():
        if line.startswith("arch ="):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith(".nv.info."):
            func = line[len(".nv.info."):].strip()
        elif line.startswith(".") or not line.strip():
            func = func if line.strip() == "" else None
        elif "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and line.strip().startswith("Value:"):
            dims = [int(x, 16) for x in line.split(":", 1)[1].split()]
            if func is not None:
                bounds[(arch, func)] = dims[0] * dims[1] * dims[2]
            want = False

    names = _demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r["mangled"]]
        r["max_threads"] = bounds.get((r["arch"], r["mangled"]))
    return rows


def reg_limit(max_threads):
    """Registers per thread that let a block of max_threads threads launch: registers are
    allocated per warp in units of 256, and the block must fit the SM's 64 K."""
    if not max_threads:
        return MAX_REGS_PER_THREAD
    warps = -(-max_threads // 32)
    r = MAX_REGS_PER_THREAD
    while r > 0 and -(-(r * 32) // 256) * 256 * warps > REGS_PER_SM:
        r -= 1
    return r


def _gpu_present():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _rows():
    rows = resources()
    if isinstance(rows, str):
        pytest.skip(rows)
    return rows


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One test per (architecture, csrc/*.cu file), so that a file's failure names that file.
SOURCES = sorted(os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


def _select(arch, source):
    rows = [r for r in _rows() if r["arch"] == arch and r["source"] == source]
    if not rows:
        present = sorted({r["arch"] for r in _rows()})
        if arch not in present:
            pytest.skip(f"the extension was built without {arch} (it holds {present}; "
                        "TORCH_CUDA_ARCH_LIST picks them, the default is 8.0;9.0)")
        pytest.fail(f"no kernel of csrc/{source} in the {arch} cubin of the extension: rebuild it "
                    "(RLHF_OPS_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    return rows


GROUPS = [(a, s) for a in ARCHS for s in SOURCES]
IDS = [f"{a}-{s}" for a, s in GROUPS]


def test_extension_holds_sm80_and_sm90():
    present = {r["arch"] for r in _rows()}
    assert present, "no cubin found in the extension"
    missing = [a for a in ARCHS if a not in present]
    if missing and (os.environ.get("TORCH_CUDA_ARCH_LIST") or _gpu_present()):
        # bench/gpu_check.sh builds for the GPU that is there only (TORCH_CUDA_ARCH_LIST).
        pytest.skip(f"the extension holds {sorted(present)} only (built for this machine's GPU "
                    f"or TORCH_CUDA_ARCH_LIST), not {missing}")
    assert not missing, f"the extension has no {missing} cubin (setup.py builds 8.0;9.0 by default)"


@pytest.mark.parametrize("arch, source", GROUPS, ids=IDS)
def test_no_local_memory_or_spills(arch, source):
    bad = [f"{r['kernel']}: stack frame {r['stack']} B, local {r['local']} B ({r['regs']} registers)"
           for r in _select(arch, source) if r["stack"] > 0 or r["local"] > 0]
    assert not bad, (f"{arch} {source}: kernels that spill registers (or keep arrays) in local "
                     "memory:\n  " + "\n  ".join(bad))


@pytest.mark.parametrize("arch, source", GROUPS, ids=IDS)
def test_registers_within_launch_bounds(arch, source):
    bad = [f"{r['kernel']}: {r['regs']} registers > {reg_limit(r['max_threads'])} "
           f"(launch bounds {r['max_threads']} threads)"
           for r in _select(arch, source) if r["regs"] > reg_limit(r["max_threads"])]
    assert not bad, f"{arch} {source}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("arch, source", GROUPS, ids=IDS)
def test_static_shared_memory_fits(arch, source):
    bad = [f"{r['kernel']}: {r['shared']} B" for r in _select(arch, source)
           if r["shared"] > STATIC_SMEM_LIMIT]
    assert not bad, f"{arch} {source}: static shared memory above 48 KiB:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_kernels_all_present_with_launch_bounds(arch):
    rows = _select(arch, "attention.cu")
    got = sorted(r["kernel"] for r in rows)
    assert got == ATTENTION_KERNELS, f"{arch}: attention kernels {got}, expected {ATTENTION_KERNELS}"
    # Every attention kernel declares __launch_bounds__(128): ptxas then keeps it launchable.
    assert all(r["max_threads"] == 128 for r in rows), \
        [(r["kernel"], r["max_threads"]) for r in rows if r["max_threads"] != 128]


def test_reg_limit():
    assert reg_limit(None) == 255 and reg_limit(128) == 255 and reg_limit(256) == 255
    assert reg_limit(512) == 128 and reg_limit(1024) == 64 and reg_limit(384) == 168


def table(rows):
    lines = [f"{'arch':6} {'source':18} {'kernel':48} {'regs':>4} {'limit':>5} {'stack':>5} "
             f"{'local':>5} {'smem':>5}"]
    for r in sorted(rows, key=lambda r: (r["source"], r["kernel"], r["arch"])):
        lines.append(f"{r['arch']:6} {r['source']:18} {r['kernel'][:48]:48} {r['regs']:4d} "
                     f"{reg_limit(r['max_threads']):5d} {r['stack']:5d} {r['local']:5d} {r['shared']:5d}")
    return "\n".join(lines)


if __name__ == "__main__":
    res = resources()
    print(res if isinstance(res, str) else table(res))
