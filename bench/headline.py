"""The headline benchmarks at the field's shapes, for the second GPU call (bench/gpu_bench.sh).

    python -m bench.headline [--out DIR] [--budget-s S] [--only attention,linear_cross_entropy]

Policy head: linear cross-entropy at N = 8,192 tokens, hidden 4,096, vocabulary 151,936 (a
Qwen-size vocabulary; no [N, V] logits in the fused op). Attention: D = 128, causal, T = 4k, 8k
and 16k with 16 heads (B·T = 16k tokens). Cross-entropy and the KL penalty as bandwidth at
V = 32k, 151,936 and 262,144. bf16 throughout. Each against eager (the reference backend),
torch.compile of it, and the peers that exist: SDPA's backends and FlexAttention, torch's
F.cross_entropy and F.linear_cross_entropy, Liger-Kernel and Cut Cross-Entropy (pure-Python
wheels that bench/fetch_peers.sh downloads and gpu_bench.sh puts on the path). Anything that
cannot run is recorded as missing or failed with the reason; cases run in the order below and a
case that the budget no longer allows is recorded as skipped.

Writes ``<out>/<slug>.json`` (docs/design.md's results format, the device named; slug h100-sxm, h200,
...) and ``<out>/<slug>.md`` (the table). Adding a case is one line in HEADLINE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

from . import harness, report, roofline
from .memory import git_commit

BF16 = torch.bfloat16
Q = "quick"       # harness size: compile and the peers enabled

# (builder, args) in the order they run: the headline shapes first. One line per case.
HEADLINE = [
    (harness._lce_case, (8192, 4096, 151936, BF16, Q, True)),     # policy head, Qwen-size V
    (harness._attn_case, (4, 16, 4096, 128, True, BF16, Q, True)),
    (harness._ce_case, (8192, 151936, BF16, Q, True)),
    (harness._kl_case, (4, 2048, 151936, BF16, Q, True)),
    (harness._attn_case, (2, 16, 8192, 128, True, BF16, Q)),
    (harness._attn_case, (1, 16, 16384, 128, True, BF16, Q)),
    (harness._ce_case, (8192, 32000, BF16, Q)),
    (harness._ce_case, (8192, 262144, BF16, Q)),
    (harness._kl_case, (4, 2048, 32000, BF16, Q)),
    (harness._kl_case, (4, 2048, 262144, BF16, Q)),
]
MODES = ("fwd+bwd", "fwd")      # training step first, then the forward alone


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--budget-s", type=float, default=None, help="stop starting measurements after S seconds")
    p.add_argument("--only", default=None, help="comma-separated ops (default: every case)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.headline: needs a GPU (the CPU smoke run is python -m bench.report)")
    import triton
    t0 = time.time()
    dev = torch.device("cuda")
    roof = roofline.measure(dev)
    print(f"roofline ({roof['label']}): copy {roof['hbm_gbps']:.1f} GB/s, bf16 matmul {roof['bf16_tflops']:.1f} TFLOP/s")
    name = torch.cuda.get_device_name(dev)
    slug = report.device_slug(name)
    cases = [build(*args) for build, args in HEADLINE]
    if a.only:
        cases = [c for c in cases if c.op in a.only.split(",")]
    res = {"device": name, "commit": os.environ.get("COMMIT") or git_commit(),
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
           "roofline": {"hbm_gbps": roof["hbm_gbps"], "bf16_tflops": roof["bf16_tflops"]},
           "roofline_label": roof["label"], "smoke": False, "size": "headline", "tests": {}, "benchmarks": []}
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{slug}.json")

    def save(entries):       # after every (case, mode): a run cut short keeps what it measured
        res["benchmarks"] = entries
        res["goals"] = report.goals(entries)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, f"{slug}.md"), "w") as f:
            f.write(report.markdown(res))

    budget = None if a.budget_s is None else max(0.0, a.budget_s - (time.time() - t0))
    save(report.run_benchmarks(dev, Q, budget_s=budget, roof=res["roofline"], progress=save,
                               cases=cases, modes=MODES))
    report.validate(res)
    print(f"wrote {path} and {slug}.md in {time.time() - t0:.0f} s")
    return res


if __name__ == "__main__":
    main()
