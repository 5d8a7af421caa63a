"""What the device really does: device-to-device copy bandwidth and bf16 matmul throughput.

    python -m bench.roofline

* ``hbm_gbps``: ``dst.copy_(src)`` of a large buffer (1 GiB each on a GPU), counted as bytes
  read + bytes written, median over repeats timed with CUDA events.
* ``bf16_tflops``: ``a @ b`` with a, b bf16 square matrices (n = 8192 on a GPU), 2·n³ FLOP.

Every benchmark states its fraction of one of these (memory-bound ops of ``hbm_gbps``,
compute-bound ones of ``bf16_tflops``). On a CPU the probe runs at small sizes (64 MiB copy,
n = 256) and is labelled as a CPU smoke figure, not a device roofline.
"""
from __future__ import annotations

import json
import statistics
import time

import torch


def time_once(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU, the host clock on a CPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _time_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(reps))


def measure(device=None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if gpu else (64 << 20)
    n = 8192 if gpu else 256
    reps = 20 if gpu else 3

    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps)
    hbm_gbps = 2 * copy_bytes / (ms * 1e-3) / 1e9
    del src, dst

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms_mm = _time_ms(lambda: a @ b, device, reps)
    bf16_tflops = 2 * n ** 3 / (ms_mm * 1e-3) / 1e12
    del a, b
    if gpu:
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    return {"device": name, "hbm_gbps": hbm_gbps, "bf16_tflops": bf16_tflops,
            "copy_bytes": copy_bytes, "matmul_n": n,
            "label": "device roofline" if gpu else "CPU smoke (small sizes, not a device roofline)"}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
