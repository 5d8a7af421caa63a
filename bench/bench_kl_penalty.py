"""Micro-benchmarks of token_logprobs and kl_penalty: eager (two log_softmax + gather), torch.compile, Liger's fused
cross entropy as per-token log-prob op; B*T = 8k tokens, V in {32k, 128k}, bf16.

Run:  pytest bench/bench_kl_penalty.py --benchmark-enable [--bench-size smoke|quick|llm]
FLOP and byte counts per mode live with the cases in bench/harness.py (and bench/README.md).
"""
from bench import harness

FAMILY = "kl_penalty"


def test_kl_penalty(benchmark, case, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, case, impl, mode, device)
