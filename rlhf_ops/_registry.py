"""Every op that chooses a backend, registered once.

One ``Op`` entry per public function that takes ``backend=``. The rest of the project reads this
table instead of keeping its own list:

  rlhf_ops/_backend.py   AUTO_PREFERENCE (``auto``'s order on CUDA tensors)
  bench/harness.py       FAMILIES (the bench_<family>.py files that harness.cases builds)
  bench/report.py        --ops names, the family of each op, the x axis of its plots
  bench/memory.py        which ops get a meta-device memory row (their spec lives there)
  bench/sanitize.py      which driver case runs each op's kernels, and which Triton modules
                         have their autotuning cut down
  tests                  that every public op with ``backend=`` is here, and every entry's
                         files and cases exist (tests/test_registry.py)

Adding an op (docs/design.md, "Adding an op", lists every file): append its entry to ``OPS``.
The fields after ``cuda`` have defaults: ``auto`` for an op with all three backends, and no
benchmark family, memory row or sanitizer case; name them when the op has them.
"""
from __future__ import annotations

from typing import NamedTuple


class Op(NamedTuple):
    name: str                    # the public function, rlhf_ops.<name>
    module: str                  # where it is defined: rlhf_ops/<module>.py
    kernels: str                 # its Triton kernels: kernels/<kernels>.py
    cuda: str | None             # its CUDA kernels: csrc/<cuda>.cu (None: no cuda backend)
    auto: tuple[str, ...] = ("triton", "cuda", "reference")
    #   ``auto``'s order on CUDA tensors: the first available one runs. Update it from measured
    #   bench results (bench/results/<device>.json); until an op has been measured on a GPU,
    #   Triton comes first because it is the backend validated in CI under the interpreter.
    bench: str | None = None     # the harness family (bench/bench_<bench>.py) whose cases time it
    bench_x: str | None = None   # the shape key its plots sweep on the x axis
    memory: bool = False         # bench/memory.py measures what it keeps for backward (a spec there)
    sanitize: str | None = None  # the bench/sanitize.py driver case that runs its kernels
    vocab_parallel: bool = False  # takes process_group= / vocab_offset= (rlhf_ops/distributed.py)


OPS: tuple[Op, ...] = (
    Op("cross_entropy", "cross_entropy", "cross_entropy", "cross_entropy", bench="cross_entropy",
       bench_x="V", memory=True, sanitize="cross_entropy", vocab_parallel=True),
    Op("linear_cross_entropy", "cross_entropy", "cross_entropy", "cross_entropy",
       bench="cross_entropy", bench_x="V", memory=True, sanitize="cross_entropy",
       vocab_parallel=True),
    Op("attention", "attention", "attention", "attention", bench="attention", bench_x="T",
       memory=True, sanitize="attention"),
    Op("attention_varlen", "attention", "attention", "attention", memory=True,
       sanitize="attention"),
    Op("attention_tree", "attention", "attention", None, auto=("triton", "reference"), memory=True),
    Op("pairwise_reward_loss", "reward", "reward", "reward", bench="reward_loss", bench_x="B",
       memory=True, sanitize="pairwise_reward"),
    Op("token_logprobs", "logprobs", "kl", "kl", bench="kl_penalty", bench_x="V", memory=True,
       sanitize="logprobs_kl", vocab_parallel=True),
    Op("linear_token_logprobs", "logprobs", "kl", "kl", memory=True, sanitize="logprobs_kl",
       vocab_parallel=True),
    Op("kl_penalty", "kl", "kl", "kl", bench="kl_penalty", bench_x="V", memory=True,
       sanitize="logprobs_kl", vocab_parallel=True),
    Op("gae", "losses", "losses", "losses", sanitize="gae"),
)

BY_NAME: dict[str, Op] = {op.name: op for op in OPS}


def backends(op: Op) -> tuple[str, ...]:
    """The backends ``op`` has: reference, triton, and cuda when it has CUDA kernels."""
    return ("reference", "triton") + (("cuda",) if op.cuda else ())


def bench_families() -> tuple[str, ...]:
    """The harness families, in the order of their first op."""
    return tuple(dict.fromkeys(op.bench for op in OPS if op.bench))
