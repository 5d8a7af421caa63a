"""Micro-benchmarks of cross_entropy and linear_cross_entropy: eager (reference), torch.compile, F.cross_entropy,
F.linear_cross_entropy (chunked), Liger-Kernel and Cut Cross-Entropy; 8192 tokens x V in {32000, 128256} bf16.

Run:  pytest bench/bench_cross_entropy.py --benchmark-enable [--bench-size smoke|quick|llm]
FLOP and byte counts per mode live with the cases in bench/harness.py (and bench/README.md).
"""
from bench import harness

FAMILY = "cross_entropy"


def test_cross_entropy(benchmark, case, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, case, impl, mode, device)
