"""Shared-prefix (tree) attention against the expanded batch it replaces (rlhf_ops.attention_tree).

A GRPO group: one prompt of P tokens and G completions of R tokens. The expanded batch runs the
G sequences "prompt ‖ completion" (G·(P + R) tokens); the tree batch runs the prompt once and the
completions as its children (P + G·R tokens), each completion attending to the prompt and causally
to itself — the same numbers for every completion token.

1. Attention, fwd / fwd+bwd, P = 4,096, R = 1,024, G = 8, H = 32, D = 128, bf16 (the issue's shape):
     tree_<backend>       rlhf_ops.attention_tree on the tree batch (triton; reference at smoke)
     expanded_<backend>   rlhf_ops.attention_varlen on the expanded batch (triton, cuda)
     flash_expanded       flash_attn_varlen_func on the expanded batch, when flash-attn is installed
   FLOP (every impl is credited with the work the tree needs, so the expanded batch's TFLOP/s are
   "effective"): 4·D·H per (query, key) pair forward, 2.5× that backward; pairs = P(P+1)/2 +
   G·(R·P + R(R+1)/2) for the tree, G·(P+R)(P+R+1)/2 expanded. Bytes: q, k, v, o (and dO, dq, dk,
   dv) of the tree's tokens.
2. A Llama-1B-shaped GRPO step (GPU, transformers installed): a random-init LlamaForCausalLM
   (d 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, vocabulary 128,256, bf16) patched with
   rlhf_ops (triton), forward to every completion token's log-prob (fused LM head), GRPO's
   policy_loss, backward; shared = a tree batch (rlhf_ops.integrations.tree), unshared = the G
   sequences "prompt ‖ completion" as one dense batch. Default P = 2,048, R = 512, G = 8 (the
   unshared step's activations fit an 80 GB GPU); --step-shape P,R,G changes it.

    pytest bench/bench_attention_tree.py --benchmark-enable [--bench-size smoke|quick|llm]
    python -m bench.bench_attention_tree [--size smoke|quick] [--step-shape 2048,512,8] [--out f.json]

Both print FLOP counts and the bytes each attention keeps for backward (measured on the meta
device) for the issue's shape on any machine. On a CPU only the smoke sizes run (reference
backend): a check that the code runs, never a speed.
"""
from __future__ import annotations

import argparse
import os

import torch

import rlhf_ops as ro

from bench import harness

ISSUE_SHAPE = dict(P=4096, R=1024, G=8, H=32, D=128)
STEP_SHAPE = (2048, 512, 8)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True)


# ------------------------------------------------------------------------ counts and bytes ---

def tree_layout(P: int, R: int, G: int, device="cpu"):
    """The tree batch (prompt, then G completions) and, for the expanded batch, the tree token
    each of its G·(P + R) tokens copies: (cu, parent, max_seqlen, index [G·(P+R)], cu_expanded)."""
    cu = torch.tensor([0, P] + [P + (g + 1) * R for g in range(G)], dtype=torch.int32, device=device)
    parent = torch.tensor([-1] + [0] * G, dtype=torch.int32, device=device)
    prompt = torch.arange(P, device=device)
    idx = torch.cat([torch.cat([prompt, P + g * R + torch.arange(R, device=device)]) for g in range(G)])
    cu_e = torch.arange(G + 1, dtype=torch.int32, device=device) * (P + R)
    return cu, parent, P + R, idx, cu_e


def _saved_bytes(fn) -> int:
    """Floating-point bytes autograd keeps for backward while ``fn`` runs (meta tensors)."""
    seen = {}

    def pack(t):
        seen[id(t)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.numel() * t.element_size() for t in seen.values() if t.is_floating_point())


def costs(P: int, R: int, G: int, H: int, D: int, Hkv: int | None = None, dtype=torch.bfloat16) -> dict:
    """Tokens, (query, key) pairs, FLOPs and bytes kept for backward (measured on the meta device
    with the triton backend's fake implementation) of one attention layer, tree vs expanded."""
    Hkv = H if Hkv is None else Hkv
    e = torch.tensor([], dtype=dtype).element_size()
    cu, parent, m, _, cu_e = tree_layout(P, R, G, "meta")
    out = {}
    for name, N, pairs in (("tree", P + G * R, P * (P + 1) // 2 + G * (R * P + R * (R + 1) // 2)),
                           ("varlen", G * (P + R), G * (P + R) * (P + R + 1) // 2)):
        q = torch.empty(N, H, D, dtype=dtype, device="meta", requires_grad=True)
        k = torch.empty(N, Hkv, D, dtype=dtype, device="meta", requires_grad=True)
        v = torch.empty(N, Hkv, D, dtype=dtype, device="meta", requires_grad=True)
        if name == "tree":
            saved = _saved_bytes(lambda: ro.attention_tree(q, k, v, cu, parent, m, backend="triton"))
        else:
            saved = _saved_bytes(lambda: ro.attention_varlen(q, k, v, cu_e, cu_e, P + R, P + R,
                                                             backend="triton"))
        fwd = 4 * D * H * pairs
        out[name] = {"tokens": N, "pairs": pairs, "fwd_flops": fwd, "fwd+bwd_flops": int(3.5 * fwd),
                     "saved_bytes": saved, "io_bytes_fwd+bwd": 6 * N * (H + Hkv) * D * e}
    return out


# ----------------------------------------------------------------------------- attention ---

def attention_case(P: int, R: int, G: int, H: int, D: int, dtype, size: str, priority=False) -> harness.Case:
    c = costs(P, R, G, H, D, dtype=dtype)["tree"]
    e = torch.tensor([], dtype=dtype).element_size()
    x = c["tokens"] * H * D * e

    def make(dev):
        dev = torch.device(dev)
        cu, parent, m, idx, cu_e = tree_layout(P, R, G, dev)
        tree = [torch.randn(c["tokens"], H, D, device=dev, dtype=dtype) for _ in range(3)]
        expanded = [t[idx].clone() for t in tree]          # the same tokens, copied per sequence
        return {"device": dev, "args": [harness._leaf(t) for t in tree + expanded],
                "kw": {"cu": cu, "parent": parent, "max": m, "cu_e": cu_e}}

    def tree(inp, backend):
        q, k, v = inp["args"][:3]
        kw = inp["kw"]
        return ro.attention_tree(q, k, v, kw["cu"], kw["parent"], kw["max"], backend=backend)

    def expanded(inp, backend):
        q, k, v = inp["args"][3:]
        cu, m = inp["kw"]["cu_e"], P + R
        return ro.attention_varlen(q, k, v, cu, cu, m, m, backend=backend)

    def flash_expanded(inp):
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as err:
            raise harness.Missing(f"flash-attn is not installed ({err})") from None
        q, k, v = inp["args"][3:]
        cu, m = inp["kw"]["cu_e"], P + R
        return flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)

    case = harness.Case(
        op="attention_tree", family="attention_tree", shape={"P": P, "R": R, "G": G, "H": H, "D": D},
        dtype=dtype, x=P, series=f"R={R},G={G}", make=make, diff=lambda out: [out],
        flop={"fwd": c["fwd_flops"], "bwd": int(2.5 * c["fwd_flops"]), "fwd+bwd": c["fwd+bwd_flops"]},
        bytes={"fwd": 4 * x, "bwd": 8 * x, "fwd+bwd": 12 * x}, bound="compute", priority=priority)
    backends = ("reference",) if size == "smoke" else ("triton",)
    for b in backends:
        case.impls[f"tree_{b}"] = harness._ours("attention_tree", b, tree)
    for b in (("reference",) if size == "smoke" else ("triton", "cuda")):
        case.impls[f"expanded_{b}"] = harness._ours("attention_varlen", b, expanded)
    if size != "smoke":
        case.impls["flash_expanded"] = flash_expanded
    return case


# -------------------------------------------------------------------- Llama-1B GRPO step ---

def step_case(P: int, R: int, G: int, size: str) -> harness.Case:
    """A GRPO policy step of a Llama-1B-shaped model on one group, shared vs unshared prompt."""
    cfg = dict(LLAMA_1B) if size != "smoke" else dict(vocab_size=97, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, tie_word_embeddings=True)
    dtype = torch.bfloat16 if size != "smoke" else torch.float32
    backend = "triton" if size != "smoke" else "reference"
    d, L, V, F_ = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    # q, o: d² each; k, v: d²·Hkv/H each; gate, up, down: d·F each; the tied embedding V·d
    n_params = V * d + L * (2 * d * d * (1 + cfg["num_key_value_heads"] / cfg["num_attention_heads"]) + 3 * d * F_)
    state = {}

    def model(dev):
        if "model" not in state:
            try:
                from transformers import LlamaConfig, LlamaForCausalLM

                from rlhf_ops.integrations.transformers import apply_rlhf_ops
            except ImportError as err:
                raise harness.Missing(f"transformers is not installed ({err})") from None
            torch.manual_seed(0)
            with torch.device(dev):                 # initialised on the device (1.2B parameters)
                m = LlamaForCausalLM(LlamaConfig(max_position_embeddings=P + R, **cfg)).to(dtype)
            state["model"] = apply_rlhf_ops(m, backend=backend)
        return state["model"]

    def make(dev):
        dev = torch.device(dev)
        g = torch.Generator(device="cpu").manual_seed(1)
        prompt = torch.randint(0, cfg["vocab_size"], (P,), generator=g)
        comps = torch.randint(0, cfg["vocab_size"], (G, R), generator=g)
        return {"device": dev, "args": [],
                "kw": {"prompt": prompt.to(dev), "comps": comps.to(dev), "adv": torch.randn(G, generator=g).to(dev)}}

    def loss(lp, inp):
        lp = lp.view(G, R)
        return ro.policy_loss(lp, lp.detach(), inp["kw"]["adv"], torch.ones_like(lp, dtype=torch.bool),
                              loss_type="grpo").loss

    def shared(inp):
        from rlhf_ops.integrations.tree import pack_groups, tree_logprobs

        m = model(inp["device"])
        if "batch" not in inp["kw"]:
            inp["kw"]["batch"] = pack_groups([inp["kw"]["prompt"]], [list(inp["kw"]["comps"])],
                                             device=inp["device"])
        return loss(tree_logprobs(m, inp["kw"]["batch"], backend=backend), inp)

    def unshared(inp):
        m = model(inp["device"])
        ids = torch.cat([inp["kw"]["prompt"].expand(G, P), inp["kw"]["comps"]], 1)     # [G, P + R]
        h = m.model(input_ids=ids, use_cache=False).last_hidden_state[:, P - 1:-1]     # predicts the completion
        lp = ro.linear_token_logprobs(h.reshape(G * R, -1), m.get_output_embeddings().weight,
                                      inp["kw"]["comps"].reshape(-1), backend=backend)
        return loss(lp, inp)

    tok_t, tok_e = P + G * R, G * (P + R)
    case = harness.Case(
        op="grpo_step", family="attention_tree", shape={"P": P, "R": R, "G": G, "d": d, "layers": L},
        dtype=dtype, x=P, series="llama-1b" if size != "smoke" else "tiny", make=make, diff=lambda out: [out],
        # the tree's work: 6·params per token (matmuls fwd+bwd) + its attention pairs
        flop={mode: int(6 * n_params * tok_t) for mode in harness.MODES},
        bytes={mode: 0 for mode in harness.MODES}, bound="compute")
    case.impls["shared"] = shared
    case.impls["unshared"] = unshared
    case.shape.update({"tokens_shared": tok_t, "tokens_unshared": tok_e})
    return case


# ---------------------------------------------------------------------------------- cases ---

def _gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def cases(size: str, step_shape=STEP_SHAPE) -> list[harness.Case]:
    if size == "smoke":
        return [attention_case(24, 8, 3, 2, 16, torch.float32, size), step_case(12, 5, 3, size)]
    s = ISSUE_SHAPE
    return [attention_case(s["P"], s["R"], s["G"], s["H"], s["D"], torch.bfloat16, size, True),
            step_case(*step_shape, size)]


def modes(case: harness.Case) -> tuple[str, ...]:
    return ("fwd", "fwd+bwd") if case.op == "attention_tree" else ("fwd+bwd",)


def pytest_generate_tests(metafunc):
    if "tree_case" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size", None) or ("quick" if _gpu() else "smoke")
    size = "quick" if size == "llm" else size
    harness.parametrize(metafunc, ("tree_case", "impl", "mode"), cases(size), modes)


def test_attention_tree(benchmark, tree_case, impl, mode, device):
    harness.run_pytest_benchmark(benchmark, tree_case, impl, mode, device)


# ------------------------------------------------------------------------------- the table ---

def print_costs(shape=ISSUE_SHAPE) -> dict:
    c = costs(**shape)
    t, e = c["tree"], c["varlen"]
    print(f"one attention layer at P={shape['P']}, R={shape['R']}, G={shape['G']}, H={shape['H']}, "
          f"D={shape['D']}, bf16 (meta device):")
    for name, r in (("tree", t), ("expanded", e)):
        print(f"  {name:<9} {r['tokens']:>7} tokens  {r['fwd+bwd_flops'] / 1e12:8.2f} TFLOP fwd+bwd  "
              f"{r['saved_bytes'] / 2**20:9.1f} MiB kept for backward")
    print(f"  expanded / tree: {e['tokens'] / t['tokens']:.2f}x tokens, "
          f"{e['fwd+bwd_flops'] / t['fwd+bwd_flops']:.2f}x FLOPs, {e['saved_bytes'] / t['saved_bytes']:.2f}x bytes")
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default=None, choices=("smoke", "quick"))
    ap.add_argument("--step-shape", default=",".join(map(str, STEP_SHAPE)), help="P,R,G of the GRPO step")
    ap.add_argument("--impls", default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    size = a.size or ("quick" if _gpu() else "smoke")
    dev = torch.device("cuda" if size != "smoke" and _gpu() else "cpu")
    counts = print_costs()
    rows = []
    print(f"{'case':<15} {'impl':<18} {'mode':<8} {'ms':>10} {'peak MiB':>9}  note")
    for c in cases(size, tuple(int(x) for x in a.step_shape.split(","))):
        base = {}
        for name in c.impls:
            if a.impls and name not in a.impls.split(","):
                continue
            for mode in modes(c):
                r = harness.measure(c, name, mode, dev, target_s=0.1 if dev.type == "cpu" else 0.5,
                                    warmup=1 if dev.type == "cpu" else 3, max_reps=5 if dev.type == "cpu" else 50)
                rows.append({"op": c.op, "impl": name, "mode": mode, "shape": c.shape,
                             "dtype": harness.DTYPE_NAMES[c.dtype], "flop": c.flop[mode], **r})
                if r["status"] != "ok":
                    print(f"{c.op:<15} {name:<18} {mode:<8} {r['status']:>10}  {r['reason'][:90]}")
                    continue
                peak = r.get("peak_mem_bytes")
                ours = name.startswith("tree") or name == "shared"
                base.setdefault(mode, {})["ours" if ours else name] = r["median_ms"]
                note = ""
                if not ours and "ours" in base[mode]:
                    note = f"{r['median_ms'] / base[mode]['ours']:.2f}x the shared-prefix time"
                print(f"{c.op:<15} {name:<18} {mode:<8} {r['median_ms']:10.3f} "
                      f"{'' if peak is None else f'{peak / 2**20:9.1f}':>9}  {note}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cpu":
        print("(CPU: smoke sizes, reference backend — the code runs; these times are not speed)")
    harness.write_rows(a.out, dev, rows, costs=counts)
    return rows, counts


if __name__ == "__main__":
    main()
