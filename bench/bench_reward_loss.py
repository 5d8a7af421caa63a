"""Micro-benchmarks of pairwise_reward_loss: eager (reference) and torch.compile; B in {64, 1024, 16384}, K in {4, 9}.

Run:  pytest bench/bench_reward_loss.py --benchmark-enable [--bench-size smoke|quick|llm]
FLOP and byte counts per mode live with the cases in bench/harness.py (and bench/README.md).
"""
from bench import harness

FAMILY = "reward_loss"


def test_reward_loss(benchmark, case, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, case, impl, mode, device)
