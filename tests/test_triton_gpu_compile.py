"""The Triton kernels compile for real GPUs (sm_90 Hopper, sm_80 Ampere), checked on a CPU machine.

The interpreter that runs the kernels in CI is more lenient than Triton's GPU front end (it accepts,
for example, a jit helper whose branches return different dtypes). So: run every op's Triton backend
under the interpreter with fp64, fp32, fp16 and bf16 inputs, record each kernel launch (the kernel,
its argument types and constexpr values), then compile each recorded specialisation to GPU machine
code with ``triton.compile`` for ``GPUTarget("cuda", 90 and 80)`` in a subprocess without
TRITON_INTERPRET. Needs no GPU (ptxas ships with triton). The attention kernels are recorded at
the interpreter's fixed block config; their autotuned GPU configs are compiled on a GPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()

TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if not -2**31 <= v < 2**31 else "i32"
    if isinstance(v, float):
        return "fp32"
    if v is None:
        return "none"
    raise TypeError(f"unexpected kernel argument {v!r}")


def _record_launches(run_ops):
    """Run ``run_ops`` under the interpreter and return the distinct kernel specialisations."""
    import inspect

    from triton.runtime import interpreter

    seen = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = list(inspect.signature(self.fn).parameters)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})  # not launch options
        consts = {k: v for k, v in bound.items() if self.fn.__annotations__.get(k) is not None
                  and "constexpr" in str(self.fn.__annotations__[k])}
        sig = {k: ("constexpr" if k in consts else _arg_type(v)) for k, v in bound.items()}
        consts = {k: (v if isinstance(v, (int, float, bool)) or v is None else str(v)) for k, v in consts.items()}
        key = (self.fn.__module__, self.fn.__name__, json.dumps(sig, sort_keys=True), json.dumps(consts, sort_keys=True))
        seen[key] = {"module": self.fn.__module__, "name": self.fn.__name__, "signature": sig, "constexprs": consts}
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        run_ops()
    finally:
        interpreter.InterpretedFunction.run = original
    return list(seen.values())


def _all_ops():
    import rlhf_ops as ro

    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(6, 300) * 3).to(dt).requires_grad_()
        t = torch.randint(0, 300, (6,))
        ro.cross_entropy(x, t, label_smoothing=0.1, backend="triton").backward()
        big = torch.randn(2, 70001).to(dt).requires_grad_()
        ro.cross_entropy(big, torch.tensor([1, 70000]), backend="triton").backward()
        lg = torch.randn(2, 3, 300).to(dt).requires_grad_()
        tk = torch.randint(0, 300, (2, 3))
        ro.token_logprobs(lg, tk, temperature=0.7, backend="triton").sum().backward()
        for est in ("k1", "k2", "k3"):
            res = ro.kl_penalty(lg, torch.randn(2, 3, 300).to(dt), tk, beta=0.1, estimator=est,
                                mask=torch.ones(2, 3), backend="triton")
            (res.logprobs.sum() + res.kl.sum()).backward()
        res = ro.kl_penalty(big[None], torch.randn(1, 2, 70001).to(dt), torch.tensor([[3, 4]]), beta=0.1,
                            backend="triton")
        res.kl.sum().backward()
        r = torch.randn(3, 9).to(dt).requires_grad_()
        ranks = torch.stack([torch.randperm(9) for _ in range(3)])
        ro.pairwise_reward_loss(r, ranks, backend="triton").backward()
        r70 = torch.randn(2, 70).to(dt).requires_grad_()
        ro.pairwise_reward_loss(r70, torch.stack([torch.randperm(70) for _ in range(2)]), backend="triton").backward()
        if dt != torch.bfloat16:  # the interpreter's bf16 tl.dot is broken; the kernel source is the same
            q = torch.randn(1, 2, 20, 64).to(dt).requires_grad_()
            k = torch.randn(1, 1, 20, 64).to(dt).requires_grad_()
            for causal in (True, False):
                ro.attention(q, k, k, causal=causal, backend="triton").sum().backward()


def _compile(specs, cc):
    """Compile recorded specialisations for compute capability ``cc``; return the failures."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for s in specs:
        fn = getattr(importlib.import_module(s["module"]), s["name"])
        fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
        while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # autotuner / heuristics wrappers
            fn = fn.fn
        sig = {k: v for k, v in s["signature"].items()}
        consts = {}
        for k, v in s["constexprs"].items():
            consts[k] = getattr(triton.language, v.split(".")[-1]) if isinstance(v, str) and v.startswith("triton.language.") else v
        for k, v in sig.items():
            if v == "none":
                sig[k] = "constexpr"
                consts[k] = None
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cc, 32))
        except Exception as e:  # noqa: BLE001 - report every failure, then fail the test
            failures.append(f"{s['name']} {s['signature']} {s['constexprs']}: {type(e).__name__}: {str(e)[:800]}")
    return failures


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled and run by the other tests")
def test_triton_kernels_compile_for_gpu(tmp_path):
    specs = _record_launches(_all_ops)
    assert len(specs) >= 10, specs
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert f"compiled {len(specs)} specialisations" in proc.stdout, proc.stdout


if __name__ == "__main__":
    specs = json.load(open(sys.argv[1]))
    fails = []
    for cc in (90, 80):
        fails += [f"sm_{cc}: {f}" for f in _compile(specs, cc)]
    if fails:
        print("\n".join(fails))
        sys.exit(1)
    print(f"compiled {len(specs)} specialisations for sm_90 and sm_80")
