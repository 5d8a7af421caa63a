"""Mutation audit of the test suite: does each listed bug make a test fail?

    python tests/mutation_audit.py                 # every mutation, on a scratch copy of the tree
    python tests/mutation_audit.py --list          # the list, nothing run
    python tests/mutation_audit.py --only kl_k3_small_d attn_key_range_hi
    python tests/mutation_audit.py --rev HEAD      # audit the committed tree instead of the checkout

Not part of CI and not collected by pytest (the file name does not start with ``test_``): each
mutation re-runs its test files under the Triton interpreter, minutes in all. Run it after
changing a kernel or its tests, and add a mutation for every bug a review finds.

How: the tree (the checkout's tracked and untracked, not ignored, files — or ``git archive`` of
``--rev``) is copied to a temporary directory, with the built ``rlhf_ops/_C*.so`` and a
``rlhf_ops/kernels`` link to ``kernels/`` (setup.py's package_dir), and imported from there
through PYTHONPATH, ahead of the editable install. The checkout is never edited, so this is
safe while others work in it. Each mutation replaces one exact snippet of one file (a snippet
that no longer exists is reported "stale": update the list), runs its tests with ``-x``, and
restores the file. First the unmutated copy runs every selection once: a mutation only counts
where its tests pass without it. Result per mutation: caught (a test failed), SURVIVED (all
passed: a gap in the suite), stale, or error (collection failed, timeout).

Exit status 0 when every applicable mutation is caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Mutation:
    name: str
    path: str          # relative to the repository root
    old: str           # exact snippet, must occur once
    new: str
    tests: list        # pytest arguments (files, -k expressions)
    why: str


MUTATIONS = [
    Mutation("kl_k3_small_d", "kernels/kl.py",
             "kl = tl.where(tl.abs(d) < 0.5, d * d * q, kl)", "kl = kl",
             ["tests/test_kl_oracle.py", "-k", "triton"],
             "k3 without its small-|d| series: cancels at |log_ratio| ~ 7e-4 (the PPO regime)"),
    Mutation("kl_k3_small_d_fp64", "kernels/kl.py",
             "kl = tl.where(tl.abs(d) < 0.5, 0.5 * d * d * q, kl)", "kl = kl",
             ["tests/test_kl_oracle.py", "-k", "triton and fp64"],
             "fp64 k3 without its small-|d| series: ~ulp(1) absolute error, 1e-4 relative at d = 1e-6"),
    Mutation("attn_key_range_hi", "kernels/attention.py",
             "r1 + off + WR + 1", "r1 + off + WR",
             ["tests/test_attention.py", "-k", "triton"],
             "causal/window upper key bound one short: wrong only when (S − T) ≡ 1 mod BLOCK_N"),
    Mutation("ce_ignored_row_loss", "kernels/cross_entropy.py",
             "loss = tl.where(valid, loss, 0.0)", "loss = loss",
             ["tests/test_cross_entropy.py", "-k", "triton"],
             "an ignored row contributes its loss"),
    Mutation("ce_label_smoothing_weight", "kernels/cross_entropy.py",
             "loss = log_s + (1.0 - eps_a) * (shift - xt)", "loss = log_s + (1.0 - 0.5 * eps_a) * (shift - xt)",
             ["tests/test_cross_entropy.py", "tests/test_properties.py", "-k", "triton and (smoothing or cross_entropy)"],
             "label smoothing weighs the target term wrong"),
    Mutation("reward_margin_low_part", "kernels/reward.py",
             "m = (to_acc(tl.zeros((), tl.float32), ACC_FP64) + m_hi) + m_lo",
             "m = to_acc(tl.zeros((), tl.float32), ACC_FP64) + m_hi",
             ["tests/test_reward.py", "-k", "triton"],
             "the margin's fp32 low part dropped: fp64 loses ~1e-8 relative"),
    Mutation("reward_one_pair_mean", "kernels/reward.py",
             "inv_n = 1.0 / tl.maximum(n, 1).to(r.dtype)", "inv_n = 1.0 / tl.maximum(n, 2).to(r.dtype)",
             ["tests/test_reward.py", "-k", "triton"],
             "a prompt with exactly one pair is halved"),
    Mutation("reward_mean_over_all_prompts", "rlhf_ops/reward.py",
             "return total / (npairs > 0).sum().clamp(min=1).to(loss.dtype)",
             "return total / max(loss.shape[0], 1)",
             ["tests/test_reward.py", "-k", "triton"],
             "reduction='mean' counts prompts without a pair"),
    Mutation("kl_k3_grad_sign", "rlhf_ops/kl.py",
             'dkl = d if estimator == "k2" else -torch.expm1(-d)',
             'dkl = d if estimator == "k2" else torch.expm1(-d)',
             ["tests/test_kl.py", "tests/test_kl_oracle.py", "-k", "triton"],
             "∂k3/∂d with the wrong sign"),
    Mutation("kl_bwd_temperature", "kernels/kl.py",
             'dx = tl.where(n_bad == 0, dx / temp, float("nan"))', 'dx = tl.where(n_bad == 0, dx, float("nan"))',
             ["tests/test_kl.py", "-k", "triton"],
             "the backward forgets 1/T"),
    Mutation("bf16_cast_truncates", "kernels/_common.py",
             "b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000", "b = b & 0xFFFF0000",
             ["tests/test_cross_entropy.py", "tests/test_properties.py", "-k",
              "triton and (low_precision or test_cross_entropy or test_token_logprobs)"],
             "bf16 outputs truncated instead of rounded to nearest even"),
    Mutation("auto_picks_reference_on_cuda", "rlhf_ops/_registry.py",
             'Op("cross_entropy", "cross_entropy", "cross_entropy", "cross_entropy", bench=',
             'Op("cross_entropy", "cross_entropy", "cross_entropy", "cross_entropy", auto=("reference",), bench=',
             ["tests/test_fake_cuda.py"],
             "auto runs the eager reference on CUDA tensors"),
    Mutation("rel_err_inf_sign", "tests/_util.py",
             "return not (torch.equal(nan_x, nan_y) and torch.equal(x[~nan_y], y[~nan_y]))",
             "return not torch.equal(nan_x, nan_y)",
             ["tests/test_properties.py", "-k", "inf_sign"],
             "the test helper scores +inf vs −inf as equal"),
]


def scratch_tree(rev: str | None) -> str:
    """A copy of the repository to mutate (see the module docstring)."""
    dst = tempfile.mkdtemp(prefix="rlhf_mutation_")
    if rev:
        arch = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=arch, check=True)
    else:
        files = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"],
                               check=True, capture_output=True).stdout.decode().split("\0")
        for f in filter(None, files):
            src = os.path.join(ROOT, f)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
                shutil.copy2(src, os.path.join(dst, f))
    for so in glob.glob(os.path.join(ROOT, "rlhf_ops", "_C*.so")):
        shutil.copy2(so, os.path.join(dst, "rlhf_ops"))
    link = os.path.join(dst, "rlhf_ops", "kernels")
    if not os.path.exists(link):
        os.symlink(os.path.join("..", "kernels"), link)
    return dst


def env_for(tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        gpu = False
    if not gpu:
        env["TRITON_INTERPRET"] = "1"
    return env


def check_imports_from(tree: str, env: dict) -> None:
    code = "import rlhf_ops, rlhf_ops.kernels; print(rlhf_ops.__file__); print(rlhf_ops.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 2 or not all(os.path.realpath(p).startswith(os.path.realpath(tree))
                                                    for p in paths):
        raise SystemExit(f"the scratch tree does not shadow the installed package: {out.stdout}{out.stderr}")


def run_tests(tree: str, env: dict, args: list, timeout: int) -> tuple[str, float, str]:
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", time.time() - t0, f"timeout after {timeout} s"
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    # pytest: 0 all passed, 1 some failed, 5 nothing collected, else an internal/collection error
    status = {0: "passed", 1: "failed", 5: "nothing"}.get(p.returncode, "error")
    return status, time.time() - t0, tail[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--rev", default=None, help="audit `git archive REV` instead of the checkout")
    ap.add_argument("--timeout", type=int, default=900, help="per pytest run, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the scratch tree")
    a = ap.parse_args(argv)
    muts = [m for m in MUTATIONS if a.only is None or m.name in a.only]
    if a.list:
        for m in muts:
            print(f"{m.name:32s} {m.path:28s} {m.why}")
        return 0
    tree = scratch_tree(a.rev)
    env = env_for(tree)
    try:
        check_imports_from(tree, env)
        print(f"scratch tree {tree} ({'rev ' + a.rev if a.rev else 'the checkout'})")
        baseline = {}
        results = []
        for m in muts:
            target = os.path.join(tree, m.path)
            src = open(target).read() if os.path.exists(target) else ""
            if src.count(m.old) != 1:
                results.append((m, "stale", 0.0, f"snippet found {src.count(m.old)} times"))
                print(f"{m.name}: stale", flush=True)
                continue
            key = tuple(m.tests)
            if key not in baseline:
                baseline[key] = run_tests(tree, env, m.tests, a.timeout)
                print(f"  baseline {' '.join(m.tests)}: {baseline[key][0]} ({baseline[key][1]:.0f} s)",
                      flush=True)
            if baseline[key][0] != "passed":
                results.append((m, "error", 0.0, f"baseline {baseline[key][0]}: {baseline[key][2]}"))
                print(f"{m.name}: error (baseline)", flush=True)
                continue
            try:
                with open(target, "w") as f:
                    f.write(src.replace(m.old, m.new))
                status, dt, tail = run_tests(tree, env, m.tests, a.timeout)
            finally:
                with open(target, "w") as f:
                    f.write(src)
            verdict = {"failed": "caught", "passed": "SURVIVED"}.get(status, "error")
            results.append((m, verdict, dt, tail))
            print(f"{m.name}: {verdict} ({dt:.0f} s) {tail}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(tree, ignore_errors=True)
    print("\nmutation                         result    seconds  why")
    for m, verdict, dt, tail in results:
        print(f"{m.name:32s} {verdict:9s} {dt:7.0f}  {m.why}" + (f"  [{tail}]" if verdict in ("error", "stale") else ""))
    applicable = [r for r in results if r[1] in ("caught", "SURVIVED")]
    caught = sum(r[1] == "caught" for r in applicable)
    print(f"\n{caught} of {len(applicable)} applicable mutations caught; "
          f"{sum(r[1] == 'stale' for r in results)} stale, {sum(r[1] == 'error' for r in results)} errors")
    return 0 if caught == len(applicable) and applicable else 1


if __name__ == "__main__":
    sys.exit(main())
