"""rlhf_ops.integrations.transformers: apply_rlhf_ops on tiny random-init models (no download).

Each supported family (Llama, Mistral with a sliding window, Qwen2 with a sliding layer, Qwen3,
Gemma-2 with softcap + sliding window, Gemma-3 with sliding layers, GPT-2 with learned positions
and a tied embedding, Phi-3 with a window, OLMo-2, Granite with its four multipliers — the logit
scaling folded into the fused loss —, Qwen2-MoE, Qwen3-MoE and Mixtral with the router loss) is
built from a config and compared with its unpatched copy running eager attention in fp32 on
right-, left-, mixed-padded, unpadded and packed batches (position_ids, with sequences starting
at non-zero positions, and cu_seq_lens): logits of the real tokens, the loss and the gradient of
every parameter. Greedy generation with the KV cache, remove_rlhf_ops, per-instance patching,
set_attn_implementation, the loss kwargs (num_items_in_batch, ignore_index, shift_labels,
skip_logits), eval mode returning logits, the entry points (attn_implementation="rlhf_ops",
AutoRlhfOpsModelForCausalLM), the transformers Trainer with compute_metrics, and the errors.

Labels: a label is scored from the position before it. After left padding, the first real token
is scored from a padding position, whose hidden state is meaningless (eager lets padding rows
attend to something, flash-attn and rlhf_ops output zeros there); such labels are set to −100
here, as any prompt token would be.
"""
import copy
import logging
import tempfile

import pytest
import torch

tf = pytest.importorskip("transformers")

import rlhf_ops.integrations.transformers as rit  # noqa: E402
from rlhf_ops.integrations.transformers import (AutoRlhfOpsModelForCausalLM, apply_rlhf_ops,  # noqa: E402
                                                remove_rlhf_ops, rlhf_ops_status)
from _util import assert_matches, rel_err  # noqa: E402
from conftest import DEVICE, backend_problem  # noqa: E402

V = 97
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2", "phi3", "olmo2",
            "granite", "qwen2_moe", "qwen3_moe", "mixtral"]
MOE = ("qwen2_moe", "qwen3_moe", "mixtral")
TOL = 1e-5          # fp32 vs fp32 eager: summation order only (a masking error is O(1e-2..1))


def tiny(family: str, n_layers: int = 2, head: str = "lm", **over):
    """A random-init model: d = 64, 4 query heads of dim 16, 2 KV heads (GQA) where the family has
    them; init std 0.2 so that attention is far from uniform (windows and softcap matter)."""
    common = dict(vocab_size=V, attn_implementation="eager", initializer_range=0.2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rope = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
    layers = (["sliding_attention", "full_attention"] * n_layers)[:n_layers]
    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.5)       # a coefficient that shows
    if family == "llama":
        cfg = tf.LlamaConfig(**rope)
    elif family == "mistral":
        cfg = tf.MistralConfig(sliding_window=4, **rope)
    elif family == "qwen2":
        rope.pop("head_dim")
        cfg = tf.Qwen2Config(use_sliding_window=True, sliding_window=4, layer_types=layers, **rope)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**rope)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(sliding_window=4, layer_types=layers, attn_logit_softcapping=1.0,
                              final_logit_softcapping=None, query_pre_attn_scalar=16,
                              tie_word_embeddings=False, **rope)   # tied: greedy repeats its input
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(sliding_window=4, layer_types=layers, query_pre_attn_scalar=16,
                                  final_logit_softcapping=None, tie_word_embeddings=False, **rope)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_positions=64, attn_pdrop=0.0,
                            resid_pdrop=0.0, embd_pdrop=0.0, **dict(common, bos_token_id=0,
                                                                     eos_token_id=0))
    elif family == "phi3":
        rope.pop("head_dim")
        cfg = tf.Phi3Config(sliding_window=4, **rope)
    elif family == "olmo2":
        cfg = tf.Olmo2Config(**rope)
    elif family == "granite":     # logits / 2 in the model: the fused loss must fold it in
        cfg = tf.GraniteConfig(logits_scaling=2.0, attention_multiplier=0.3,
                               embedding_multiplier=2.0, residual_multiplier=0.5, **rope)
    elif family == "qwen2_moe":
        rope.pop("head_dim")
        cfg = tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, use_sliding_window=True,
                                sliding_window=4, layer_types=layers, **moe, **rope)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, **moe, **rope)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=4, sliding_window=4, **moe, **rope)
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    if head == "lm":
        model = tf.AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = 1
        model = tf.AutoModelForSequenceClassification.from_config(cfg)
    return model.to(DEVICE)


# packed rows (position_ids, no attention_mask): 3, 2 and 1 sequences starting at 0; and the same
# cut with sequences that start at non-zero positions — the 3rd sequence of row 0 continues at 7
# after 3, row 1 starts at 2 — so that only "the position does not grow by 1" finds every start
PACKED = [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3], list(range(10))]
PACKED_OFFSET = [[4, 5, 6, 0, 1, 2, 3, 7, 8, 9], [2, 3, 4, 5, 6, 7, 0, 1, 2, 3], list(range(3, 13))]


def _cu_from_positions(pos):
    """cu_seq_lens of a [1, N] row of position_ids, as a padding-free collator computes them."""
    flat = pos.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1] + 1
    cu = torch.cat([start.nonzero().squeeze(1), torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def batch(kind: str, B: int = 3, T: int = 10, seed: int = 1):
    """input_ids + (attention_mask | position_ids | cu_seq_lens) + labels for one batch kind."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    if kind in ("packed", "packed_offset"):
        pos = torch.tensor(PACKED if kind == "packed" else PACKED_OFFSET)[:B, :T]
        out = dict(input_ids=ids, position_ids=pos, labels=ids.clone())
    elif kind == "packed_cu":   # one flat row, as DataCollatorWithFlattening / TRL padding-free
        pos = torch.tensor(PACKED_OFFSET)[:B, :T].reshape(1, -1)
        cu, m = _cu_from_positions(pos)
        out = dict(input_ids=ids.reshape(1, -1), position_ids=pos, labels=ids.reshape(1, -1),
                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    elif kind == "dense":       # no mask, no packing
        out = dict(input_ids=ids, labels=ids.clone())
    else:
        mask = torch.ones(B, T, dtype=torch.long)
        if kind == "right":
            mask[0, 6:] = 0
            mask[1, 3:] = 0
        elif kind == "left":
            mask[0, :4] = 0
            mask[1, :7] = 0
        elif kind == "mixed":
            mask[0, :4] = 0
            mask[1, 5:] = 0
        elif kind != "full":
            raise ValueError(kind)
        ids = ids.masked_fill(mask == 0, 0)           # the pad token (id 0) where there is padding
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1:][mask[:, :-1] == 0] = -100     # scored from a padding position: see docstring
        out = dict(input_ids=ids, attention_mask=mask, labels=labels)
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in out.items()}


def _eager_inputs(inp):
    """What the eager baseline gets: eager attention ignores cu_seq_lens and packs from
    position_ids (the same cut)."""
    return {k: v for k, v in inp.items() if not k.startswith(("cu_seq_lens", "max_length"))}


def _real(inp):
    m = inp.get("attention_mask")
    return torch.ones_like(inp["input_ids"], dtype=torch.bool) if m is None else m.bool()


class _Spy:
    """Counts the calls of the dense and varlen routes."""

    def __init__(self, monkeypatch):
        self.calls = {"dense": 0, "varlen": 0}
        for name, key in (("flash_attn_func", "dense"), ("flash_attn_varlen_func", "varlen")):
            fn = getattr(rit, name)

            def wrapped(*a, _fn=fn, _key=key, **kw):
                self.calls[_key] += 1
                return _fn(*a, **kw)
            monkeypatch.setattr(rit, name, wrapped)


def _run(model, inp, **kw):
    """loss, logits of every position (from the final hidden state and the LM head, with the
    model's logit scaling and final softcap) and the gradient of every parameter, for one
    forward/backward with labels."""
    model.zero_grad(set_to_none=True)
    captured = {}
    base = getattr(model, model.base_model_prefix)
    hook = base.register_forward_hook(lambda m, a, o: captured.update(h=o.last_hidden_state))
    try:
        out = model(**inp, use_cache=False, **kw)
    finally:
        hook.remove()
    out.loss.backward()
    scale, cap = rit.logit_transform(model.config)
    logits = model.get_output_embeddings()(captured["h"]).detach() * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, logits, grads


def _compare(family, kind, backend, n_layers, monkeypatch, config=None, **kw):
    torch.manual_seed(0)
    ref = tiny(family, n_layers, **(config or {}))
    model = apply_rlhf_ops(copy.deepcopy(ref), backend=backend)
    inp = batch(kind)
    spy = _Spy(monkeypatch)
    out_r, logits_r, grads_r = _run(ref, _eager_inputs(inp), **kw)
    assert spy.calls == {"dense": 0, "varlen": 0}       # the eager copy is untouched
    out, logits, grads = _run(model, inp, **kw)
    assert out.logits is None                            # the fused loss never forms logits
    route = "dense" if kind == "dense" else "varlen"
    assert spy.calls[route] == n_layers and sum(spy.calls.values()) == n_layers, spy.calls

    assert torch.allclose(out_r.logits.detach(), logits_r, rtol=1e-6, atol=1e-6)   # the capture
    m = _real(inp)
    assert rel_err(logits[m], logits_r[m]) <= TOL, f"logits {rel_err(logits[m], logits_r[m]):.2e}"
    assert rel_err(out.loss, out_r.loss) <= TOL, f"loss {out.loss.item()} vs {out_r.loss.item()}"
    if family in MOE and kw.get("output_router_logits"):
        assert rel_err(out.aux_loss, out_r.aux_loss) <= TOL and out_r.aux_loss > 0
    assert grads.keys() == grads_r.keys() and len(grads) == len(list(ref.parameters()))
    for name in grads_r:
        e = rel_err(grads[name], grads_r[name])
        assert e <= TOL, f"grad of {name}: relative error {e:.2e}"
    return out, out_r


REFERENCE_CASES = ([(f, k) for f in FAMILIES for k in ("mixed", "packed")] +
                   [("llama", k) for k in ("right", "left", "full", "dense", "packed_offset",
                                           "packed_cu")] +
                   [("gemma2", "left"), ("gpt2", "dense"), ("mistral", "packed_cu")])


@pytest.mark.parametrize("family,kind", REFERENCE_CASES)
def test_matches_eager_reference_backend(family, kind, monkeypatch):
    _compare(family, kind, "reference", 2, monkeypatch)


@pytest.mark.parametrize("family,kind,backend", [("gemma2", "mixed", "reference"), ("gemma2", "packed", "reference"),
                                                ("gemma3_text", "mixed", "reference"),
                                                ("gemma2", "mixed", "triton"), ("gemma2", "packed_cu", "triton")])
def test_final_logit_softcapping_matches_eager(family, kind, backend, monkeypatch):
    """Gemma-2/3's final_logit_softcapping: the fused loss passes it as softcap= (c·tanh(z/c)
    before the softmax), loss and every gradient as the unpatched model's, padded and packed. c =
    1 bites on these logits (|z| ~ 3): the uncapped loss is far off."""
    if backend_problem(backend):
        pytest.skip(backend_problem(backend))
    out, out_r = _compare(family, kind, backend, 2 if backend == "reference" else 1, monkeypatch,
                          config=dict(final_logit_softcapping=1.0))
    torch.manual_seed(0)
    uncapped = tiny(family, 2 if backend == "reference" else 1)(**_eager_inputs(batch(kind)), use_cache=False)
    assert rel_err(uncapped.loss, out_r.loss) > 0.05


@pytest.mark.parametrize("family", MOE)
def test_moe_router_loss_matches_eager(family, monkeypatch):
    """output_router_logits=True: the load-balancing loss (padded batch: the mask enters it) is
    added to the fused loss with the model's coefficient, gradients reach the routers."""
    _compare(family, "mixed", "reference", 2, monkeypatch, output_router_logits=True)


TRITON_CASES = ([(f, k) for f in ("llama", "mistral", "qwen2", "gemma2", "gpt2")
                 for k in ("mixed", "packed")] +
                [(f, "mixed") for f in ("qwen3", "gemma3_text", "phi3", "olmo2", "granite",
                                        "qwen3_moe")] +
                [("llama", "right"), ("llama", "left"), ("llama", "dense"), ("llama", "packed_cu")])


@pytest.mark.parametrize("family,kind", TRITON_CASES)
def test_matches_eager_triton(family, kind, monkeypatch):
    why = backend_problem("triton")
    if why:
        pytest.skip(why)
    _compare(family, kind, "triton", 1, monkeypatch)      # one layer: the interpreter is slow


def test_padded_layout():
    """The padded route's layout on a mask with a hole: real tokens first, in order; three
    segments per row; the inverse permutation."""
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    src_q, dst_q, src_k, cu_q, cu_k = rit._padded_meta(mask, 2)      # queries: last 2 columns
    assert src_k.tolist() == [[1, 2, 4, 0, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert src_q.tolist() == [[1, 0], [0, 1], [0, 1]]               # of mask[:, 3:]
    assert torch.equal(src_q.gather(1, dst_q), torch.arange(2).expand(3, 2))
    assert cu_q.tolist() == [0, 1, 2, 2, 4, 4, 4, 4, 6, 6]
    assert cu_k.tolist() == [0, 3, 3, 5, 10, 10, 10, 10, 10, 15]
    assert cu_q.dtype == cu_k.dtype == torch.int32


def _generate(model, ids, mask, n, cache="dynamic"):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None, cache_implementation=cache)


@pytest.mark.parametrize("family,cache", [(f, "dynamic") for f in ("llama", "mistral", "qwen2",
                                                                      "gemma2", "gemma3_text", "gpt2",
                                                                      "phi3", "qwen2_moe")] +
                         [(f, "static") for f in ("llama", "gemma2")])
def test_greedy_generation_with_kv_cache_matches(family, cache):
    """Left-padded prompts (and unpadded ones, whose all-ones mask generate() drops), prompt +
    new tokens longer than the sliding windows; a static cache is longer than what it holds."""
    torch.manual_seed(0)
    ref = tiny(family).eval()
    model = apply_rlhf_ops(copy.deepcopy(ref), backend="reference")
    inp = batch("left")
    for mask in (inp["attention_mask"], torch.ones_like(inp["attention_mask"])):
        g_ref = _generate(ref, inp["input_ids"], mask, 8, cache)
        g = _generate(model, inp["input_ids"], mask, 8, cache)
        assert torch.equal(g, g_ref)
        assert len(set(g_ref[:, -8:].flatten().tolist())) > 3   # not a degenerate repetition


def test_greedy_generation_triton():
    why = backend_problem("triton")
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    ref = tiny("mistral", 1).eval()
    model = apply_rlhf_ops(copy.deepcopy(ref), backend="triton")
    inp = batch("mixed", B=2, T=6)
    mask = torch.ones_like(inp["attention_mask"])
    mask[0, :3] = 0
    assert torch.equal(_generate(model, inp["input_ids"], mask, 4),
                       _generate(ref, inp["input_ids"], mask, 4))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_remove_restores_original_outputs_exactly(family):
    torch.manual_seed(0)
    model = tiny(family)
    inp = batch("mixed")
    cfg_before, cls_before = model.config, type(model.config)
    before = model(**inp, use_cache=False)
    apply_rlhf_ops(model, backend="reference")
    assert model.config is not cfg_before and model.config._attn_implementation == rit.ATTN_IMPLEMENTATION
    assert rlhf_ops_status(model) == {"family": family, "attention": True, "loss": True,
                                      "backend": "reference"}
    assert model(**inp, use_cache=False).logits is None
    remove_rlhf_ops(model)
    after = model(**inp, use_cache=False)
    assert model.config is cfg_before and type(model.config) is cls_before
    assert all(m.config is cfg_before for m in model.modules() if "config" in m.__dict__)
    assert "forward" not in model.__dict__ and rlhf_ops_status(model) is None
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)


def test_patching_is_per_instance():
    """Two models built from one config object: patching one leaves the other eager."""
    cfg = tiny("llama").config
    torch.manual_seed(0)
    a = tf.LlamaForCausalLM(cfg).to(DEVICE)
    b = copy.deepcopy(a)
    assert a.config is cfg
    inp = batch("left")
    before = b(**inp, use_cache=False)
    apply_rlhf_ops(a, backend="reference")
    assert cfg._attn_implementation == "eager" and b.config._attn_implementation == "eager"
    assert a.config._attn_implementation == rit.ATTN_IMPLEMENTATION
    after = b(**inp, use_cache=False)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    # writes through the view reach the shared config (one attribute dict)
    a.config.use_cache = False
    assert cfg.use_cache is False
    a.config.use_cache = True
    with pytest.raises(RuntimeError, match="call remove_rlhf_ops"):
        a.config._attn_implementation = "sdpa"


def test_set_attn_implementation_raises_until_removed(monkeypatch):
    """model.set_attn_implementation writes the config's internal attribute: on a patched model
    it raises (as the config setter does) instead of being ignored; after remove_rlhf_ops it works."""
    torch.manual_seed(0)
    model = apply_rlhf_ops(tiny("llama", 1), backend="reference")
    with pytest.raises(RuntimeError, match="call remove_rlhf_ops.* to 'sdpa'"):
        model.set_attn_implementation("sdpa")
    model.set_attn_implementation(rit.ATTN_IMPLEMENTATION)          # already so: nothing to do
    spy = _Spy(monkeypatch)
    model(**batch("mixed"))
    assert spy.calls["varlen"] == 1                                 # still rlhf_ops
    remove_rlhf_ops(model)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    model(**batch("mixed"))
    assert spy.calls["varlen"] == 1                                 # sdpa now


def test_config_view_class_and_save_pretrained(tmp_path):
    """The view's class builds ordinary configs (transformers instantiates type(config)() for the
    defaults); a deep copy is a view; save_pretrained of a patched model saves the original
    weights and config, which load back unpatched."""
    torch.manual_seed(0)
    model = apply_rlhf_ops(tiny("llama", 1), backend="reference")
    fresh = type(model.config)()
    assert fresh._attn_implementation is None
    fresh._attn_implementation = "sdpa"
    assert fresh._attn_implementation == "sdpa"
    assert copy.deepcopy(model.config)._attn_implementation == rit.ATTN_IMPLEMENTATION
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").to(DEVICE)
    assert loaded.config._attn_implementation == "eager" and rlhf_ops_status(loaded) is None
    for p, q in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_loss_kwargs_follow_transformers(monkeypatch):
    """num_items_in_batch, ignore_index, shift_labels, return_dict=False, attention only / loss only."""
    torch.manual_seed(0)
    ref = tiny("qwen3")
    model = apply_rlhf_ops(copy.deepcopy(ref), backend="reference")
    inp = batch("right")
    ids, mask, labels = inp["input_ids"], inp["attention_mask"], inp["labels"]
    for kw in (dict(num_items_in_batch=torch.tensor(7)), dict(num_items_in_batch=11),
               dict(ignore_index=-1, labels=labels.masked_fill(labels == -100, -1)),
               dict(shift_labels=labels)):           # used as given, not shifted
        kw = {"labels": labels, **kw}
        r = ref(input_ids=ids, attention_mask=mask, use_cache=False, **kw).loss
        o = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).loss
        assert rel_err(o, r) <= TOL, (kw.keys(), o.item(), r.item())
    tup = model(ids, mask, None, None, None, labels, False, return_dict=False)    # positional labels
    assert isinstance(tup, tuple) and rel_err(tup[0], ref(**inp, use_cache=False).loss) <= TOL
    with pytest.raises(TypeError, match="got 'labels' twice"):
        model(ids, mask, None, None, None, labels, labels=labels)
    # attention only: logits are formed by the model's own head, the loss by transformers
    only_attn = apply_rlhf_ops(copy.deepcopy(ref), loss=False, backend="reference")
    assert "forward" not in only_attn.__dict__ and only_attn(**inp).logits is not None
    # loss only: eager attention, fused loss
    only_loss = apply_rlhf_ops(copy.deepcopy(ref), attention=False, backend="reference")
    assert only_loss.config._attn_implementation == "eager"
    out = only_loss(**inp, use_cache=False)
    assert out.logits is None and rel_err(out.loss, ref(**inp, use_cache=False).loss) <= TOL


def test_eval_mode_and_skip_logits(monkeypatch):
    """Training mode + labels: fused, no logits. Eval mode (Trainer.evaluate / predict), or
    skip_logits=False: the model's own head — logits and loss — on rlhf_ops attention.
    skip_logits=True fuses in eval mode too."""
    torch.manual_seed(0)
    ref = tiny("llama")
    model = apply_rlhf_ops(copy.deepcopy(ref), backend="reference")
    inp = batch("left")
    want = ref(**inp, use_cache=False)
    spy = _Spy(monkeypatch)
    for mode, kw, fused in (("train", {}, True), ("train", dict(skip_logits=False), False),
                            ("eval", {}, False), ("eval", dict(skip_logits=True), True)):
        getattr(model, mode)()
        out = model(**inp, use_cache=False, **kw)
        assert (out.logits is None) is fused, (mode, kw)
        assert rel_err(out.loss, want.loss) <= TOL
        if not fused:
            m = _real(inp)
            assert rel_err(out.logits[m], want.logits[m]) <= TOL
    assert spy.calls["varlen"] == 4 * 2                              # attention is rlhf_ops' in all
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(input_ids=inp["input_ids"], skip_logits=True)


def test_gradient_checkpointing_and_autocast():
    """Recomputed layers (gradient checkpointing) give the same gradients; under bf16 autocast
    attention and the fused loss run in bf16, with an error vs fp32 no worse than eager's."""
    torch.manual_seed(0)
    ref = tiny("qwen2")
    model = apply_rlhf_ops(copy.deepcopy(ref), backend="reference")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inp = batch("mixed")
    out_r, _, grads_r = _run(ref, inp)
    out, _, grads = _run(model, inp)
    assert rel_err(out.loss, out_r.loss) <= TOL
    for name in grads_r:
        assert rel_err(grads[name], grads_r[name]) <= TOL, name
    model.gradient_checkpointing_disable()
    dev = torch.device(DEVICE).type
    with torch.autocast(dev, dtype=torch.bfloat16), torch.no_grad():
        eager16 = ref(**inp, use_cache=False).loss
        ours16 = model(**inp, use_cache=False).loss
    assert ours16.dtype == torch.float32
    assert_matches(ours16, out_r.loss.detach(), eager16, what="bf16 autocast loss")


def test_all_ignored_labels_give_zero_loss():
    model = apply_rlhf_ops(tiny("llama"), backend="reference")
    inp = batch("full")
    out = model(input_ids=inp["input_ids"], labels=torch.full_like(inp["input_ids"], -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or not p.grad.abs().any() for p in model.parameters())


def test_reward_model_head_gets_attention_only(monkeypatch):
    """A sequence-classification (reward) model: attention patched, its own score head kept."""
    torch.manual_seed(0)
    ref = tiny("llama", head="seqcls")
    model = apply_rlhf_ops(copy.deepcopy(ref), backend="reference")
    assert rlhf_ops_status(model)["loss"] is False and "forward" not in model.__dict__
    inp = batch("right")
    inp.pop("labels")
    spy = _Spy(monkeypatch)
    r, o = ref(**inp).logits, model(**inp).logits
    assert spy.calls["varlen"] == 2 and o.shape == (3, 1)
    assert rel_err(o, r) <= TOL


# ----------------------------------------------------------------------------- entry points ---

def test_attn_implementation_entry(monkeypatch, tmp_path):
    """from_pretrained(..., attn_implementation="rlhf_ops") after the import: attention on rlhf_ops
    (default backend), the model's own loss and logits; its family is checked at the first
    forward. AutoRlhfOpsModelForCausalLM: the apply_rlhf_ops patch from a path or a config."""
    torch.manual_seed(0)
    ref = tiny("mistral")
    ref.save_pretrained(tmp_path)
    inp = batch("mixed")
    spy = _Spy(monkeypatch)
    want = ref(**inp, use_cache=False)
    created = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="rlhf_ops").to(DEVICE)
    assert rlhf_ops_status(created) is None                          # no fused loss
    got = created(**inp, use_cache=False)
    assert spy.calls["varlen"] == 2 and got.logits is not None
    assert rel_err(got.loss, want.loss) <= TOL

    for model in (AutoRlhfOpsModelForCausalLM.from_pretrained(tmp_path, backend="reference"),
                  AutoRlhfOpsModelForCausalLM.from_config(ref.config, backend="reference")):
        assert rlhf_ops_status(model) == {"family": "mistral", "attention": True, "loss": True,
                                          "backend": "reference"}
        model.to(DEVICE).train()
        model.load_state_dict(ref.state_dict())
        out = model(**inp, use_cache=False)
        assert out.logits is None and rel_err(out.loss, want.loss) <= TOL

    olmo = tf.OlmoConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="model_type 'olmo' is not supported"):
        AutoRlhfOpsModelForCausalLM.from_config(olmo)
    bad = tf.AutoModelForCausalLM.from_config(olmo, attn_implementation="rlhf_ops").to(DEVICE)
    with pytest.raises(ValueError, match="model_type 'olmo' was created with attn_implementation="
                                         "'rlhf_ops'.*not been validated"):
        bad(**batch("mixed"))
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoRlhfOpsModelForCausalLM()


def test_trainer_evaluate_with_compute_metrics():
    """A real transformers Trainer: training on the fused loss (the same per-step losses as the
    unpatched model), then evaluate(compute_metrics=...) gets logits (the same eval loss and
    token accuracy as the unpatched model) and predict() returns them."""
    Dataset = pytest.importorskip("datasets", reason="a test extra (not on the GPU image)").Dataset

    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):
        n = 5 + i % 4
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    data = Dataset.from_list(rows)

    def collate(features):
        L = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": torch.zeros(len(features), L, dtype=torch.long),
               "attention_mask": torch.zeros(len(features), L, dtype=torch.long),
               "labels": torch.full((len(features), L), -100)}
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(f["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(f["labels"])
        return out

    def accuracy(pred):
        logits, labels = pred.predictions, pred.label_ids
        hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)
        return {"token_accuracy": float(hit.sum() / (labels[:, 1:] != -100).sum())}

    results = {}
    for name in ("eager", "rlhf_ops"):
        torch.manual_seed(0)
        model = tiny("llama", 1)
        if name == "rlhf_ops":
            apply_rlhf_ops(model, backend="reference")
        args = tf.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                                    per_device_eval_batch_size=4, max_steps=3, learning_rate=0.5,
                                    optim="sgd", logging_steps=1, report_to="none",
                                    save_strategy="no", use_cpu=DEVICE == "cpu", seed=0,
                                    disable_tqdm=True)
        trainer = tf.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                             data_collator=collate, compute_metrics=accuracy)
        trainer.remove_callback(tf.PrinterCallback)
        trainer.train()
        metrics = trainer.evaluate()
        pred = trainer.predict(data)
        results[name] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], metrics, pred)
    (loss_e, m_e, p_e), (loss_o, m_o, p_o) = results["eager"], results["rlhf_ops"]
    assert len(loss_o) == len(loss_e) == 3
    for a, b in zip(loss_o, loss_e):
        assert abs(a - b) <= TOL * abs(b), (loss_o, loss_e)
    assert abs(m_o["eval_loss"] - m_e["eval_loss"]) <= TOL * m_e["eval_loss"]
    assert m_o["eval_token_accuracy"] == m_e["eval_token_accuracy"]
    assert p_o.predictions.shape == p_e.predictions.shape and p_o.predictions.shape[-1] == V
    real = p_e.label_ids != -100                                # logits at real tokens
    assert rel_err(torch.as_tensor(p_o.predictions[real]), torch.as_tensor(p_e.predictions[real])) <= TOL


def test_warns_once_when_the_forward_is_replaced(caplog):
    """A trainer that wraps the forward of a patched model (TRL installs its own fused LM head)
    takes the loss away from rlhf_ops: one warning says so."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = apply_rlhf_ops(tiny("llama", 1), backend="reference")
    trl_utils.add_fused_lm_head(model)
    inp = batch("mixed")
    with caplog.at_level(logging.WARNING, logger=rit.__name__):
        for _ in range(2):
            model(**inp, fused_lm_head=True)
    hits = [r for r in caplog.records if "was replaced after apply_rlhf_ops" in r.getMessage()]
    assert len(hits) == 1 and "FusedLMHeadMixin" in hits[0].getMessage()


# ----------------------------------------------------------------------------------- errors ---

def test_unsupported_and_bad_use_raise():
    bert = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match=r"BertModel \(model_type 'bert'\) is not supported.*"
                                         r"Supported families: llama, mistral"):
        apply_rlhf_ops(bert)
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel"):
        apply_rlhf_ops(torch.nn.Linear(2, 2))
    gemma = tiny("gemma2", 1, final_logit_softcapping=30.0)
    apply_rlhf_ops(gemma, loss=False, backend="reference")           # attention only
    assert gemma(**batch("left")).logits is not None
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        apply_rlhf_ops(tiny("llama", 1), backend="tpu")
    with pytest.raises(ValueError, match="is not patched"):
        remove_rlhf_ops(tiny("llama", 1))

    model = apply_rlhf_ops(tiny("llama", 1, attention_dropout=0.1), backend="reference")
    inp = batch("mixed")
    with pytest.raises(ValueError, match="attention dropout p=0.1 in training mode"):
        model(**inp)
    with pytest.raises(ValueError, match="logits_to_keep cannot be combined with the fused loss"):
        model(**inp, logits_to_keep=1)
    model.eval()
    model(**inp)                                                      # no dropout in eval mode
    assert model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                 logits_to_keep=1).logits.shape[1] == 1               # not fused in eval mode
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(**inp, output_attentions=True)
    mask4 = torch.zeros(3, 1, 10, 10, device=DEVICE)
    with pytest.raises(ValueError, match="4-D attention mask"):
        model(input_ids=inp["input_ids"], attention_mask=mask4)


@pytest.mark.skipif(DEVICE != "cpu", reason="the Triton interpreter runs on CPU tensors only")
def test_bf16_triton_under_interpreter():
    """bf16 attention on the Triton backend under the interpreter is refused (its tl.dot is wrong
    there); the fused loss has no tl.dot and runs, as accurate as eager bf16."""
    torch.manual_seed(0)
    ref = tiny("llama", 1)
    model = apply_rlhf_ops(copy.deepcopy(ref).to(torch.bfloat16), backend="triton")
    with pytest.raises(TypeError, match="bfloat16 inputs on the Triton backend under the CPU "
                                        "interpreter"):
        model(**batch("mixed"))
    model = apply_rlhf_ops(copy.deepcopy(ref).to(torch.bfloat16), attention=False, backend="triton")
    inp = batch("mixed")
    want = ref(**inp, use_cache=False).loss.detach()
    eager16 = ref.to(torch.bfloat16)(**inp, use_cache=False).loss
    assert_matches(model(**inp, use_cache=False).loss, want, eager16, what="bf16 fused loss")


def test_e2e_bench_smoke():
    """bench/bench_e2e_llama.py at its CPU smoke size: every variant runs (Liger may be missing),
    and the sdpa and rlhf_ops steps compute the same loss from the same weights."""
    import importlib
    import pathlib
    import sys
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    bench = importlib.import_module("bench.bench_e2e_llama")
    rows = {r["variant"]: r for r in bench.main(["--size", "smoke", "--variants",
                                                 "sdpa,rlhf_ops:reference,liger", "--pad"])}
    assert rows["sdpa"]["status"] == rows["rlhf_ops:reference"]["status"] == "ok", rows
    assert rows["liger"]["status"] in ("ok", "missing")
    assert abs(rows["rlhf_ops:reference"]["loss"] - rows["sdpa"]["loss"]) <= TOL * rows["sdpa"]["loss"]


@pytest.mark.parametrize("packed", [False, True])
def test_sft_example_matches_unpatched(packed):
    """examples/sft_llama.py with the Trainer (gradient accumulation: num_items_in_batch), padded
    or padding-free batches: the same per-step losses as without rlhf_ops (SGD keeps it tight)."""
    pytest.importorskip("datasets", reason="examples/sft_llama.py builds its data with datasets")
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sft_llama.py"
    spec = importlib.util.spec_from_file_location("_example_sft_llama", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = dict(steps=3, packed=packed, layers=1, lr=0.5, optim="sgd", grad_accum=2, batch_size=4,
              eval_n=0, log=False)
    base = mod.run(baseline=True, **kw)["losses"]
    ours = mod.run(backend="reference", **kw)["losses"]
    assert len(base) == len(ours) == 3
    for a, b in zip(ours, base):
        assert abs(a - b) <= TOL * abs(b), (ours, base)
    assert base[-1] < base[0]
