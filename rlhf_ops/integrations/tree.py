"""Shared-prefix (tree) batches for Hugging Face transformers models: a prompt computed once for
its G completions (GRPO / RLOO groups), or the turns of a multi-turn rollout with branches.

    from rlhf_ops.integrations.transformers import apply_rlhf_ops
    from rlhf_ops.integrations.tree import pack_groups, tree_logprobs
    model = apply_rlhf_ops(model)                       # rlhf_ops attention (the tree route below)
    batch = pack_groups(prompts, completions)           # prompts[i]: token ids; completions[i]: G lists
    lp = tree_logprobs(model, batch)                    # [M]: every completion token's log-prob
    per_completion = lp.split(batch.scored_lengths)     # completion by completion, in order

``pack_tree(segments, parent)`` is the general form: token segments that form a forest in
depth-first pre-order (``parent[s] < s``, −1 for a root, a segment's descendants right after it).
The batch is one packed row: ``input_ids`` / ``position_ids`` [1, N] (a token's position continues
from its ancestors' total length, so RoPE sees each completion right after its prompt),
``cu_seqlens`` int32 [n + 1], ``parent`` int32 [n] and ``max_seqlen`` (the longest "ancestors ‖
segment"). ``tree_forward(model, batch)`` runs the model on it: every attention layer then calls
``rlhf_ops.attention_tree`` (the patched attention of ``rlhf_ops.integrations.transformers``
routes a call that carries ``rlhf_ops_tree`` here), so a token sees its ancestors' tokens and,
causally, its own segment — the prompt's tokens are computed once, not G times.

Scored tokens: token j of a scored segment is predicted by the hidden state just before it in
"ancestors ‖ segment" (for j = 0, the last token of the nearest non-empty ancestor). ``src`` holds
those rows of the packed hidden states and ``tgt`` the tokens; ``tree_logprobs`` runs
``rlhf_ops.linear_token_logprobs`` on them (no [N, V] logits), with the model's logit scaling.
The first token of a root segment has nothing before it and is not scored.

A final logit softcap (Gemma-2/3's ``final_logit_softcapping``) is applied by the fused head
(``softcap=``). Refused with an error (no fallback): a layer with a sliding window or non-causal
attention, an attention mask or a KV cache together with a tree batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .. import _backend
from ..attention import attention_tree
from ..logprobs import linear_token_logprobs

__all__ = ["TreeBatch", "pack_tree", "pack_groups", "tree_forward", "tree_logprobs", "TREE_KWARG"]

# the keyword the tree description travels under, from the model's forward to every attention call
TREE_KWARG = "rlhf_ops_tree"


def _err(msg: str) -> str:
    return f"rlhf_ops.integrations.tree: {msg}"


@dataclass
class TreeBatch:
    input_ids: Tensor        # [1, N] the segments' tokens, packed in order
    position_ids: Tensor     # [1, N] ancestors' total length + index in the segment
    cu_seqlens: Tensor       # int32 [n + 1]
    parent: Tensor           # int32 [n]
    max_seqlen: int          # the longest "ancestors ‖ segment"
    src: Tensor              # int64 [M] the packed row whose hidden state predicts each scored token
    tgt: Tensor              # int64 [M] the scored tokens
    scored_lengths: list     # tokens scored per scored segment, in segment order
    scored_segments: list    # the scored segments' indices

    def forward_kwargs(self) -> dict:
        """What ``model(**batch.forward_kwargs())`` needs: no attention mask, no cache."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False,
                TREE_KWARG: (self.cu_seqlens, self.parent, self.max_seqlen)}


def _tokens(x, what: str) -> list[int]:
    if isinstance(x, Tensor):
        if x.dim() != 1 or x.is_floating_point():
            raise ValueError(_err(f"{what} must be a 1-D integer tensor or a list of ints, got "
                                  f"{x.dtype} of shape {tuple(x.shape)}"))
        return [int(t) for t in x.tolist()]
    if not isinstance(x, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        raise TypeError(_err(f"{what} must be a 1-D integer tensor or a list of ints, got {type(x).__name__}"))
    return list(x)


def pack_tree(segments: Sequence, parent: Sequence[int], *, score: Sequence[bool] | None = None,
              device=None) -> TreeBatch:
    """Pack token segments that form a forest in depth-first pre-order into one tree batch.
    ``score[s]``: score segment s's tokens (default: every segment that has a parent)."""
    segs = [_tokens(s, f"segments[{i}]") for i, s in enumerate(segments)]
    par = [int(p) for p in parent]
    if len(par) != len(segs):
        raise ValueError(_err(f"parent has {len(par)} entries for {len(segs)} segments"))
    score = [p >= 0 for p in par] if score is None else [bool(x) for x in score]
    if len(score) != len(segs):
        raise ValueError(_err(f"score has {len(score)} entries for {len(segs)} segments"))
    starts, ids, pos = [], [], []
    before = []            # the last packed row of "ancestors ‖ s" so far (−1: none)
    total = []             # len("ancestors ‖ s")
    path: list[int] = []   # pre-order check: the previous segment and its ancestors
    src, tgt, lengths, scored = [], [], [], []
    for s, (toks, p) in enumerate(zip(segs, par)):
        if not -1 <= p < s or (p != -1 and p not in path):
            raise ValueError(_err(f"segment {s}'s parent {p} breaks the forest's depth-first pre-order "
                                  f"(parent[s] < s, and a segment's descendants right after it)"))
        path = (path[:path.index(p) + 1] if p != -1 else []) + [s]
        start, above = len(ids), (total[p] if p != -1 else 0)
        last = before[p] if p != -1 else -1
        if score[s]:
            rows = [last] + list(range(start, start + len(toks) - 1))
            if last < 0:          # a root: its first token is not scored
                rows, toks_s = rows[1:], toks[1:]
            else:
                toks_s = toks
            rows = rows[:len(toks_s)]
            src += rows
            tgt += toks_s
            lengths.append(len(toks_s))
            scored.append(s)
        starts.append(start)
        ids += toks
        pos += range(above, above + len(toks))
        total.append(above + len(toks))
        before.append(start + len(toks) - 1 if toks else last)
    cu = starts + [len(ids)]
    dev = torch.device("cpu") if device is None else torch.device(device)
    lt = lambda x: torch.tensor(x, dtype=torch.long, device=dev)   # noqa: E731
    return TreeBatch(input_ids=lt(ids)[None], position_ids=lt(pos)[None],
                     cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
                     parent=torch.tensor(par, dtype=torch.int32, device=dev),
                     max_seqlen=max(total, default=0), src=lt(src), tgt=lt(tgt), scored_lengths=lengths,
                     scored_segments=scored)


def pack_groups(prompts: Sequence, completions: Sequence[Sequence], *, device=None) -> TreeBatch:
    """A tree per prompt: the prompt (root, not scored) and its completions (children, scored).
    ``completions[i]`` holds prompt i's completions; the scored tokens come completion by
    completion in that order (``scored_lengths``)."""
    if len(prompts) != len(completions):
        raise ValueError(_err(f"{len(prompts)} prompts but {len(completions)} lists of completions"))
    segments, parent = [], []
    for p, group in zip(prompts, completions):
        root = len(segments)
        segments.append(p)
        parent.append(-1)
        for c in group:
            segments.append(c)
            parent.append(root)
    return pack_tree(segments, parent, device=device)


def tree_attention(q: Tensor, k: Tensor, v: Tensor, tree, *, softmax_scale=None, causal=True,
                   window_size=(-1, -1), softcap=0.0, backend=None, module_name="attention") -> Tensor:
    """The patched transformers attention's tree route: q [1, N, Hq, D], k/v [1, N, Hkv, D] →
    [1, N, Hq, D] through ``rlhf_ops.attention_tree``."""
    cu, parent, max_seqlen = tree
    if not causal:
        raise ValueError(_err(f"{module_name} is not causal; a tree batch needs causal attention"))
    if tuple(window_size) != (-1, -1):
        raise ValueError(_err(f"{module_name} has a sliding window {tuple(window_size)}; attention_tree "
                              f"has none (run this model without a tree batch)"))
    if q.shape[0] != 1:
        raise ValueError(_err(f"a tree batch is one packed row [1, N]; the attention got {q.shape[0]} rows"))
    _backend.require("attention_tree", backend, q.device, exact=True, where=_err(module_name),
                     dtype=q.dtype, head_dim=q.shape[-1], n_batch=parent.shape[0], n_heads=q.shape[2],
                     softcap=softcap)
    out = attention_tree(q[0], k[0], v[0], cu, parent, max_seqlen, scale=softmax_scale, softcap=softcap,
                         backend=backend)
    return out[None]


def tree_forward(model, batch: TreeBatch, **kwargs):
    """The base model (``model.<base_model_prefix>``, e.g. LlamaModel) on a tree batch: its output,
    whose ``last_hidden_state`` [1, N, d] holds every packed token's final hidden state."""
    for bad in ("attention_mask", "past_key_values"):
        if kwargs.get(bad) is not None:
            raise ValueError(_err(f"{bad} cannot be combined with a tree batch"))
    base = getattr(model, model.base_model_prefix, model)
    return base(**batch.forward_kwargs(), **kwargs)


def tree_logprobs(model, batch: TreeBatch, *, temperature: float = 1.0, return_entropy: bool = False,
                  backend: str | None = None):
    """log π(token) [M] of the batch's scored tokens (and their entropies with ``return_entropy``)
    from a causal LM run on the tree batch: the LM head on the scored rows only
    (``linear_token_logprobs``; Granite-style logit scaling folded into the hidden states, a final
    logit softcap passed as ``softcap=``)."""
    from .transformers import logit_transform

    hidden = tree_forward(model, batch).last_hidden_state[0]
    scale, softcap = logit_transform(model.config)
    head = model.get_output_embeddings()
    h = hidden[batch.src.to(hidden.device)] * scale
    bias = None if head.bias is None else head.bias * scale
    return linear_token_logprobs(h, head.weight, batch.tgt.to(hidden.device), bias=bias,
                                 temperature=temperature, return_entropy=return_entropy,
                                 softcap=float(softcap or 0.0), backend=backend)
