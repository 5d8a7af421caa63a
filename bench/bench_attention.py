"""Micro-benchmarks of attention (issue 3): eager math (reference), torch.compile, SDPA flash / efficient / cuDNN / math,
FlexAttention with a causal block mask; B*T = 16k tokens, T in {512..16k}, D in {64, 128}, causal and not, bf16.

Run:  pytest bench/bench_attention.py --benchmark-enable [--bench-size smoke|quick|llm]
FLOP and byte counts per mode live with the cases in bench/harness.py (and bench/README.md).
"""
from bench import harness

FAMILY = "attention"


def test_attention(benchmark, case, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, case, impl, mode, device)
