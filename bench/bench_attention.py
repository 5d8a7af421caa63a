"""Micro-benchmarks of attention: eager math (reference), torch.compile, SDPA flash / efficient / cuDNN / math,
FlexAttention with a causal block mask; B*T = 16k tokens, T in {512..16k}, D in {64, 128}, causal and not, bf16.

Varlen: one packed row of 16k tokens whose document lengths are log-normal (the mix an
SFT/GRPO trainer packs), causal, bf16, D = 128, 16 heads. Implementations on the same tokens:
  varlen_triton / varlen_cuda   rlhf_ops.attention_varlen on the packed row
  padded_triton                 rlhf_ops.attention on the documents right-padded to the longest
                                (right padding + causal: real queries see only real keys)
  sdpa_mask                     F.scaled_dot_product_attention on the padded batch with a boolean
                                causal-and-padding mask
  flash_varlen                  flash_attn.flash_attn_varlen_func, when flash-attn is installed
  dense_triton                  rlhf_ops.attention on B×T = 16k tokens of one length (the mean
                                document length rounded to 64): the dense kernel's own rate
FLOPs count real tokens only: Σ_b 2·T_b(T_b + 1)·D·H forward (causal), 2.5× that backward, so
padded implementations get no credit for their padding. Goal on a GPU: varlen ≥ 0.9× dense's
TFLOP/s, ≥ 3× faster than padded_triton.

Run:  pytest bench/bench_attention.py --benchmark-enable [--bench-size smoke|quick|llm]
      python -m bench.bench_attention [--tokens 16384] [--modes fwd,fwd+bwd]   (varlen table)
On a CPU the varlen cases are a smoke test (a 1k-token row, reference backend) and report the
real-token fraction of the padded batch.
FLOP and byte counts per mode live with the cases in bench/harness.py (and bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import rlhf_ops as ro
from bench import harness

FAMILY = "attention"


def test_attention(benchmark, case, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, case, impl, mode, device)


# ---------------------------------------------------------------------------------- varlen ---

def lognormal_lengths(total: int, median: int = 512, sigma: float = 1.0, lo: int = 16, hi: int = 8192,
                      seed: int = 0) -> list[int]:
    """Document lengths (log-normal, clipped to [lo, hi]) that fill ``total`` tokens exactly."""
    g = torch.Generator().manual_seed(seed)
    out, left = [], total
    while left > 0:
        n = int(math.exp(math.log(median) + sigma * float(torch.randn((), generator=g))))
        n = min(max(n, lo), hi, left)
        out.append(n)
        left -= n
    return out


def varlen_mix(lengths: list[int]) -> dict:
    """Real tokens, padded tokens and the FLOPs of the real tokens (causal)."""
    n, T = len(lengths), max(lengths)
    return {"docs": n, "max_len": T, "real_tokens": sum(lengths), "padded_tokens": n * T,
            "real_fraction": sum(lengths) / (n * T),
            "causal_pairs": sum(t * (t + 1) // 2 for t in lengths)}


def _varlen_case(lengths, H, D, dtype, device_type):
    mix = varlen_mix(lengths)
    fwd = 4 * mix["causal_pairs"] * D * H               # two matmuls, 2 FLOP per MAC
    e = torch.tensor([], dtype=dtype).element_size()
    x = mix["real_tokens"] * H * D * e
    N, n, T = mix["real_tokens"], mix["docs"], mix["max_len"]

    def make(dev):
        dev = torch.device(dev)
        q, k, v = (torch.randn(N, H, D, device=dev, dtype=dtype).requires_grad_() for _ in range(3))
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        pos = torch.cat([torch.arange(t, device=dev) for t in lengths])
        seq = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(lengths, device=dev))
        return {"device": dev, "args": [q, k, v], "kw": {"cu": cu, "max": T, "flat": seq * T + pos}}

    case = harness.Case(
        op="attention_varlen", family="attention",
        shape={"tokens": N, "docs": n, "max_len": T, "H": H, "D": D, "causal": 1}, dtype=dtype, x=N,
        series=f"D={D},lognormal", make=make, diff=lambda out: [out],
        flop={"fwd": fwd, "bwd": int(2.5 * fwd), "fwd+bwd": int(3.5 * fwd)},
        bytes={"fwd": 4 * x, "bwd": 8 * x, "fwd+bwd": 12 * x}, bound="compute")

    def varlen(backend):
        def fn(inp):
            q, k, v = inp["args"]
            cu, m = inp["kw"]["cu"], inp["kw"]["max"]
            return harness._ours("attention_varlen", backend,
                                 lambda i, b: ro.attention_varlen(q, k, v, cu, cu, m, m, backend=b))(inp)
        return fn

    def padded(inp):
        """[N, H, D] → [n, H, T, D] right-padded (the padding is part of the cost)."""
        flat = inp["kw"]["flat"]
        outs = []
        for t in inp["args"]:
            p = t.new_zeros(n * T, H, D).index_put((flat,), t)
            outs.append(p.view(n, T, H, D).transpose(1, 2))
        return outs

    def unpadded(out, inp):
        return out.transpose(1, 2).reshape(n * T, H, D)[inp["kw"]["flat"]]

    def padded_ours(backend):
        def fn(inp):
            q, k, v = padded(inp)
            return unpadded(harness._ours("attention", backend,
                                          lambda i, b: ro.attention(q, k, v, backend=b))(inp), inp)
        return fn

    def sdpa_mask(inp):
        q, k, v = padded(inp)
        real = torch.arange(T, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None] & real[:, None, :]
        mask = mask | ~real[:, :, None]                    # padded queries: any key (no NaN rows)
        return unpadded(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]), inp)

    def flash_varlen(inp):
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as err:
            raise harness.Missing(f"flash-attn is not installed ({err})") from None
        q, k, v = inp["args"]
        cu, m = inp["kw"]["cu"], inp["kw"]["max"]
        return flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)

    case.impls["varlen_reference"] = varlen("reference")
    if device_type == "cuda":
        case.impls.update({"varlen_triton": varlen("triton"), "varlen_cuda": varlen("cuda"),
                           "padded_triton": padded_ours("triton"), "sdpa_mask": sdpa_mask,
                           "flash_varlen": flash_varlen})
    else:
        case.impls["padded_reference"] = padded_ours("reference")
        case.impls["sdpa_mask"] = sdpa_mask
    return case, mix


def varlen_cases(device_type: str, tokens: int | None = None):
    """The log-normal packed row (16k tokens on a GPU, 1k on a CPU) and the dense rate reference."""
    gpu = device_type == "cuda"
    tokens = tokens or (16384 if gpu else 1024)
    H, D = (16, 128) if gpu else (2, 32)
    dtype = torch.bfloat16 if gpu else torch.float32
    lengths = lognormal_lengths(tokens, median=512 if gpu else 64, hi=8192 if gpu else 512)
    case, mix = _varlen_case(lengths, H, D, dtype, device_type)
    mean = max(64, round(tokens / len(lengths) / 64) * 64)
    dense = harness._attn_case(max(1, tokens // mean), H, mean, D, True, dtype, "smoke")
    dense.impls = {k: v for k, v in dense.impls.items() if k in (("triton", "cuda") if gpu else ("reference",))}
    return case, mix, dense


@pytest.mark.parametrize("vmode", ["fwd", "fwd+bwd"])
def test_attention_varlen_smoke(vmode):
    """Every varlen implementation runs here (reference/SDPA on a CPU) and agrees on the real
    tokens; the report states the real-token fraction of the padded batch."""
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    case, mix, _ = varlen_cases(torch.device(device).type)
    assert 0.05 < mix["real_fraction"] < 0.95, mix
    inp = case.make(device)
    outs = {}
    for name in case.impls:
        r = harness.measure(case, name, vmode, device, warmup=1, reps=1)
        assert r["status"] in ("ok", "missing"), (name, r)
        if r["status"] == "ok":
            outs[name] = case.impls[name](inp).float()
    ref = outs.pop("varlen_reference")
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=name)
    print(f"varlen mix: {mix}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--out", default=None, help="JSON file for the table (default: print only)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
                          else "cpu")
    case, mix, dense = varlen_cases(device.type, a.tokens)
    print(f"device {device}, {mix['docs']} documents, {mix['real_tokens']} real tokens, longest "
          f"{mix['max_len']}: the padded batch is {mix['real_fraction']:.1%} real tokens")
    rows = []
    for mode in a.modes.split(","):
        for c in (case, dense):
            for name in c.impls:
                r = harness.measure(c, name, mode, device)
                if r["status"] == "ok":
                    r.update(harness.rates(c, mode, r["median_ms"], None))
                rows.append({"case": c.op, "impl": name, "mode": mode, **r})
                rate = f"{r['median_ms']:9.3f} ms {r['tflops']:7.2f} TFLOP/s" if r["status"] == "ok" \
                    else f"{r['status']}: {r.get('reason', '')[:100]}"
                print(f"{mode:8} {c.op:17} {name:17} {rate}")
    tuning = autotune_probe(device) if device.type == "cuda" else []
    if a.out:
        json.dump({"device": str(device), "mix": mix, "rows": rows, "autotune": tuning}, open(a.out, "w"),
                  indent=1)


def autotune_probe(device) -> list:
    """GPU: wall time of the first call at rollout lengths 1000, 1024 (same bucket: no re-tuning),
    1500 (new bucket), and the config the autotuner chose with the registers / spills of the
    loaded kernel (what the offline audit predicts, on this GPU's toolchain)."""
    import time

    from rlhf_ops.kernels import attention as ka

    out = []
    for T in (1000, 1024, 1500):
        q, k, v = (torch.randn(4, 16, T, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ro.attention(q, k, v, backend="triton").sum().backward()
        torch.cuda.synchronize()
        out.append({"T": T, "first_call_s": round(time.perf_counter() - t0, 3)})
        print(f"first fwd+bwd call at T={T}: {out[-1]['first_call_s']} s (bucket {ka.length_bucket(T)})")
    for name in ("_attn_fwd_tuned", "_attn_bwd_dkdv_tuned", "_attn_bwd_dq_tuned"):
        tuner = getattr(ka, name)
        for key, cfg in getattr(tuner, "cache", {}).items():
            out.append({"kernel": name, "key": str(key), "config": str(cfg)})
            print(f"{name}: {cfg}")
        try:   # the loaded kernels' registers and spills (layout of the JIT cache varies by version)
            for cache in tuner.fn.device_caches.values():
                for kern in cache[0].values():
                    info = {"kernel": name, "n_regs": kern.n_regs, "n_spills": kern.n_spills,
                            "shared": kern.metadata.shared, "warps": kern.metadata.num_warps}
                    out.append(info)
                    print(info)
        except Exception as e:  # noqa: BLE001 - informative only
            print(f"{name}: could not read the kernel cache ({type(e).__name__}: {e})")
    return out


if __name__ == "__main__":
    main()
