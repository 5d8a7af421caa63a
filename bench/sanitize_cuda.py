"""Every CUDA kernel of csrc/ on small edge-case shapes, forward and backward, for compute-sanitizer.

    python bench/sanitize_cuda.py                      # plain run (CUDA tensors, the built extension)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --kernel-name kns=rlhf \\
        --error-exitcode 7 python bench/sanitize_cuda.py

bench/gpu_check.sh runs it under memcheck, racecheck, initcheck and synccheck side by side,
instrumenting only our kernels (they all live in namespace ``rlhf``). Cases: the cross-entropy,
log-prob/KL, pairwise-reward and gae kernels through the public API (bench/sanitize.py's
``cuda/`` cases: wide rows, out-of-range targets, several tokens per row, the entropy gradient,
tiled pairs, gae dense and packed), and the attention kernels called directly: dense fp16/bf16
at D 64 and 128 with GQA and T ≠ S both ways, and varlen with ragged and empty sequences, a
max_seqlen below a real length (the NaN rows beyond the grid) and tokens before the first and
after the last sequence (the NaN rows of tokens in no sequence, forward and backward). Prints
one line per case.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.sanitize import _cases, run_cases  # noqa: E402

import rlhf_ops  # noqa: E402,F401  (loads the extension: torch.ops.rlhf_ops_cuda)


def attention_cases():
    ops = torch.ops.rlhf_ops_cuda
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)

    def cu(lens, start=0):
        return torch.tensor([start + x for x in itertools.accumulate([0, *lens])], dtype=torch.int32,
                            device="cuda")

    def dense():
        for dtype, D, (B, Hq, Hkv, T, S), causal in [
                (torch.float16, 64, (2, 4, 2, 17, 33), True), (torch.bfloat16, 128, (1, 3, 1, 70, 9), True),
                (torch.float16, 128, (1, 2, 2, 65, 65), False), (torch.bfloat16, 64, (1, 2, 1, 5, 0), True)]:
            q, dout = rnd(B, Hq, T, D, dtype=dtype), rnd(B, Hq, T, D, dtype=dtype)
            k, v = rnd(B, Hkv, S, D, dtype=dtype), rnd(B, Hkv, S, D, dtype=dtype)
            out, lse = ops.attention_fwd(q, k, v, causal, 0.125)
            ops.attention_bwd(dout, q, k, v, out, lse, causal, 0.125)

    def varlen():
        # (q lengths, k lengths, max_q, max_k, tokens before / after the sequences (q), (k))
        for dtype, D, lq, lk, mq, mk, (pq, aq), (pk, ak) in [
                (torch.float16, 64, [1, 0, 17, 70], [3, 5, 0, 66], 70, 66, (0, 0), (0, 0)),
                (torch.bfloat16, 128, [9, 130], [130, 2], 130, 130, (0, 0), (0, 0)),
                (torch.float16, 64, [10, 150], [140, 150], 60, 60, (0, 0), (0, 0)),   # max_seqlen too small
                (torch.float16, 64, [4, 6], [5, 5], 6, 5, (2, 3), (1, 4))]:           # tokens in no sequence
            Nq, Nk = pq + sum(lq) + aq, pk + sum(lk) + ak
            q, dout = rnd(Nq, 4, D, dtype=dtype), rnd(Nq, 4, D, dtype=dtype)
            k, v = rnd(Nk, 2, D, dtype=dtype), rnd(Nk, 2, D, dtype=dtype)
            out, lse = ops.attention_varlen_fwd(q, k, v, cu(lq, pq), cu(lk, pk), mq, mk, True, 0.125)
            ops.attention_varlen_bwd(dout, q, k, v, out, lse, cu(lq, pq), cu(lk, pk), mq, mk, True, 0.125)

    return {"cuda/attention_dense": dense, "cuda/attention_varlen": varlen}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing run")
        return 2
    if not hasattr(torch.ops.rlhf_ops_cuda, "attention_fwd"):
        print("the CUDA extension is not loaded: nothing run")
        return 2
    cases = {k: v for k, v in _cases("cuda").items() if k.startswith("cuda/")}
    cases.update(attention_cases())
    return 1 if run_cases(cases, sync=True, what="cuda sanitize driver") else 0


if __name__ == "__main__":
    sys.exit(main())
