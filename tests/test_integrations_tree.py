"""rlhf_ops.integrations.tree: a transformers model on a shared-prefix (tree) batch.

Oracle: the unpatched model (SDPA attention, float64: eager attention takes its softmax in fp32)
run on each "prompt ‖ completion" (or "turns so far") sequence separately; the tree batch must
give every completion token the same log-prob, and the weights the same gradient as the sum over
the separate forwards.
"""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlhf_ops.integrations.transformers import apply_rlhf_ops  # noqa: E402
from rlhf_ops.integrations.tree import pack_groups, pack_tree, tree_logprobs  # noqa: E402
from _util import assert_matches  # noqa: E402
from conftest import backend_problem  # noqa: E402


TOL = 1e-10


@pytest.fixture(autouse=True)
def _rmsnorm_in_float64(monkeypatch):
    """Llama's RMSNorm computes in fp32 even in a float64 model, so a different summation order
    inside attention (~1e-16) can flip an fp32 rounding there (~1e-8): the comparison runs it in
    the input dtype (both models), so that fp64 results agree to fp64 accuracy."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).double().eval()


def _separate_logprobs(model, seqs, first):
    """log π of tokens first[i]: of sequence i, one forward per sequence (the eager model)."""
    out = []
    for s, f in zip(seqs, first):
        ids = torch.tensor(s)[None]
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        out.append(logp[f - 1:-1].gather(1, ids[0, f:, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_group_logprobs_equal_separate_forwards(backend):
    if backend_problem(backend):
        pytest.skip(backend_problem(backend))
    eager = _llama()
    ours = apply_rlhf_ops(_llama(), backend=backend)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (7, 4)]
    completions = [[torch.randint(0, 61, (n,), generator=g).tolist() for n in (5, 1, 3)],
                   [torch.randint(0, 61, (n,), generator=g).tolist() for n in (2, 6)]]
    batch = pack_groups(prompts, completions)
    assert batch.input_ids.shape == (1, 7 + 9 + 4 + 8) and batch.scored_lengths == [5, 1, 3, 2, 6]
    assert batch.position_ids[0, 7:12].tolist() == [7, 8, 9, 10, 11]      # continue after the prompt
    lp = tree_logprobs(ours, batch)
    seqs = [p + c for p, cs in zip(prompts, completions) for c in cs]
    first = [len(p) for p, cs in zip(prompts, completions) for _ in cs]
    ref = _separate_logprobs(eager, seqs, first)
    assert_matches(lp, ref, tol=TOL, what="completion log-probs")
    # gradients: the tree's shared prompt gets the sum over its completions' sequences
    lp.sum().backward()
    ref.sum().backward()
    for (name, a), b in zip(ours.named_parameters(), eager.parameters()):
        assert_matches(a.grad, b.grad, tol=TOL, what=f"grad {name}")


def test_multi_turn_tree_and_empty_segments():
    """A chain with a branch (prompt → answer → user turn → two answers) and an empty completion:
    each scored token's log-prob equals the separate forward of its whole conversation so far."""
    eager, ours = _llama(2), apply_rlhf_ops(_llama(2), backend="reference")
    segs = [[3, 9, 4], [11, 12], [20, 21, 22], [30, 31], [], [40]]
    parent = [-1, 0, 1, 2, 2, 0]
    batch = pack_tree(segs, parent)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3]
    assert batch.max_seqlen == 10
    lp = tree_logprobs(ours, batch)
    convs = {1: [3, 9, 4, 11, 12], 2: [3, 9, 4, 11, 12, 20, 21, 22], 3: [3, 9, 4, 11, 12, 20, 21, 22, 30, 31],
             5: [3, 9, 4, 40]}
    firsts = {1: 3, 2: 5, 3: 8, 5: 3}
    assert batch.scored_segments == [1, 2, 3, 4, 5] and batch.scored_lengths == [2, 3, 2, 0, 1]
    ref = _separate_logprobs(eager, list(convs.values()), list(firsts.values()))
    assert_matches(lp, ref, tol=TOL, what="multi-turn log-probs")


def test_tree_batch_refusals():
    with pytest.raises(ValueError, match="breaks the forest's depth-first pre-order"):
        pack_tree([[1], [2], [3], [4]], [-1, 0, 0, 1])
    with pytest.raises(ValueError, match="parent 1 breaks"):
        pack_tree([[1], [2]], [-1, 1])
    with pytest.raises(TypeError, match=r"segments\[0\] must be a 1-D integer tensor or a list of ints"):
        pack_tree(["ab"], [-1])
    ours = apply_rlhf_ops(_llama(), backend="reference")
    batch = pack_groups([[1, 2, 3]], [[[4, 5]]])
    with pytest.raises(ValueError, match="attention_mask cannot be combined with a tree batch"):
        from rlhf_ops.integrations.tree import tree_forward
        tree_forward(ours, batch, attention_mask=torch.ones(1, 5))
    mistral_like = apply_rlhf_ops(_llama(), backend="reference")
    for layer in mistral_like.model.layers:
        layer.self_attn.sliding_window = 2
    with pytest.raises(ValueError, match="sliding window"):
        tree_logprobs(mistral_like, batch)


def test_final_logit_softcap_is_applied():
    """Gemma-2's final logit softcap (and its attention softcap) through the tree path: equal to the
    separate forwards of the unpatched model, which apply c·tanh(z/c) to the logits (c = 0.05: a
    random-init model's logits are ~0.1, so the cap bites). Full attention
    on every layer (a sliding-window layer is refused by the tree path)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from transformers.models.gemma2 import modeling_gemma2

    def build():
        torch.manual_seed(0)
        cfg = Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=64, final_logit_softcapping=0.05,
                           attn_logit_softcapping=50.0, layer_types=["full_attention"] * 2,
                           attn_implementation="eager")
        return Gemma2ForCausalLM(cfg).double().eval()

    orig = modeling_gemma2.Gemma2RMSNorm.forward
    modeling_gemma2.Gemma2RMSNorm.forward = lambda self, x: (   # in the input dtype, as for Llama
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight))
    try:
        eager, ours = build(), apply_rlhf_ops(build(), backend="reference")
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, 61, (6,), generator=g).tolist()]
        completions = [[torch.randint(0, 61, (n,), generator=g).tolist() for n in (4, 3)]]
        lp = tree_logprobs(ours, pack_groups(prompts, completions))
        seqs = [prompts[0] + c for c in completions[0]]
        ref = _separate_logprobs(eager, seqs, [6, 6])
        # Gemma-2's attention softcap needs its eager attention, whose softmax runs in fp32: ~1e-9
        assert_matches(lp, ref, tol=1e-8, what="completion log-probs with a final logit softcap")
        # the cap bites: without it the log-probs differ
        uncapped = build()
        uncapped.config.final_logit_softcapping = None
        assert (_separate_logprobs(uncapped, seqs, [6, 6]) - ref).abs().max() > 1e-3
    finally:
        modeling_gemma2.Gemma2RMSNorm.forward = orig
