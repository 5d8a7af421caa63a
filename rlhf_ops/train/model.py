"""A minimal GPT in the notation of docs/design.md, built on the rlhf_ops public ops.

    h_0 = U·W_e + W_p                       token embedding + learned positions
    h_l = block(h_{l−1}),  l = 1..n         pre-LN: x + attn(LN(x)), x + mlp(LN(x))
    P(u) = softmax(LN(h_n)·W_eᵀ)            unembedding tied to W_e

The LM loss never materialises a softmax here: it goes through ``rlhf_ops.linear_cross_entropy``.
``ScalarHeadGPT`` is the same trunk with the unembedding replaced by a scalar head: the reward model
reads it at each response's last real token, the PPO value model at every token.

Shared-prefix batches (``TreeBatch``, ``pack_rollout``): the rows of a rollout packed as a forest —
per group of rows with one prompt, the prompt once (a root) and each row's response (a child) —
run with ``rlhf_ops.attention_tree``, positions continuing from the prompt's length. The
log-probs (``GPT.forward(tree=..., logprobs_of=...)``) and values (``ScalarHeadGPT``) are taken
at the response's action positions only: the same numbers as the dense padded forward there.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import rlhf_ops as ro
from rlhf_ops.distributed import split_replicated, zigzag_split
from rlhf_ops.nn import CausalSelfAttention


@dataclass
class GPTConfig:
    vocab_size: int = 32
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    backend: str | None = None     # rlhf_ops backend for attention and the losses
    vocab_parallel: bool = False   # LM loss with the vocabulary split over the ranks (GPT.forward)
    context_parallel: bool = False  # LM loss with every sequence split zigzag over the ranks


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class TreeBatch(NamedTuple):
    """Packed tokens that form a forest (``rlhf_ops.attention_tree``) and where a dense rollout's
    action positions are in it."""
    idx: torch.Tensor        # [N] tokens, segment after segment
    pos: torch.Tensor        # [N] positions: the ancestors' total length + index in the segment
    cu: torch.Tensor         # int32 [n + 1] segment offsets
    parent: torch.Tensor     # int32 [n] (−1: a root)
    max_seqlen: int          # the longest "ancestors ‖ segment"
    sel: torch.Tensor        # bool [B, T] the dense positions that are taken (the mask's)
    rows: torch.Tensor       # [M] the packed row of each taken position, in sel's row-major order

    @property
    def tokens(self) -> int:
        return int(self.idx.shape[0])

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """values [M] at the taken positions → [B, T], 0 elsewhere (differentiable)."""
        out = values.new_zeros(self.sel.shape)
        return out.masked_scatter(self.sel, values)


def pack_rollout(inp: torch.Tensor, mask: torch.Tensor, group: int = 1) -> TreeBatch:
    """Rows of a right-padded rollout → a tree batch. Row b of ``inp`` [B, T] is its prompt and
    then its response (actions at the positions where ``mask`` [B, T] is set: n_b − 1 …
    n_b + r_b − 2 for a prompt of n_b tokens and a response of r_b); every ``group`` consecutive
    rows share one prompt. A group becomes a root (the prompt's n tokens) and one child per row
    (its r_b − 1 response tokens that are inputs); action position n − 1 reads the prompt's last
    token, shared by the group's rows. ``group=1`` (PPO: a prompt per row, nothing to share): each
    row is one root segment, the rows without their padding. Packed row-major from a keep-mask
    (the first row of a group keeps its prompt and response, the others their response), so the
    segments come in order: root, child 0, child 1, …. Two host reads (the prompt check,
    max_seqlen): training-loop code, not an op."""
    B, T = inp.shape
    if B % group:
        raise ValueError(f"pack_rollout: {B} rows do not split into groups of {group}")
    dev = inp.device
    sel = mask.bool()
    r = sel.sum(1)
    t = torch.arange(T, device=dev)
    n = torch.where(r > 0, sel.float().argmax(1) + 1, T)                  # prompt lengths [B]
    m = (r - 1).clamp(min=0)                                               # response inputs [B]
    lead = torch.arange(B, device=dev) // group * group                    # each row's group's first row
    prompt = t[None, :] < n[:, None]
    if bool(((n != n[lead]) | ((inp != inp[lead]) & prompt).any(1)).any()):
        raise ValueError(f"pack_rollout: the rows of each group of {group} must share one prompt")
    first = (torch.arange(B, device=dev) == lead)[:, None]
    keep = (t[None, :] < (n + m)[:, None]) & (first | ~prompt)
    flat = keep.reshape(-1).long().cumsum(0).view(B, T) - 1              # packed row of a kept token
    flat = torch.where(keep, flat, flat[lead])          # a prompt token: its copy in the group's root
    if group == 1:                                                         # [B] whole rows, roots
        lengths, parent = n + m, torch.full_like(n, -1)
    else:                                                                  # [groups, 1 + G]
        lengths = torch.cat([n.view(-1, group)[:, :1], m.view(-1, group)], 1)
        parent = torch.full_like(lengths, -1)
        parent[:, 1:] = (torch.arange(lengths.shape[0], device=dev) * (group + 1))[:, None]
    cu = torch.cat([lengths.new_zeros(1), lengths.reshape(-1).cumsum(0)]).to(torch.int32)
    return TreeBatch(inp[keep], t.expand(B, T)[keep], cu, parent.reshape(-1).to(torch.int32),
                     int((n + m).max()) if B else 0, sel, flat[sel])


def _tree_attention(attn: CausalSelfAttention, x: torch.Tensor, tree: TreeBatch) -> torch.Tensor:
    """The block's attention on packed x [N, d] over the tree (its QKV and output projections)."""
    N = x.shape[0]
    D, Hq, Hkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    q, k, v = attn.qkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    y = ro.attention_tree(q.view(N, Hq, D), k.view(N, Hkv, D), v.view(N, Hkv, D), tree.cu, tree.parent,
                          tree.max_seqlen, backend=attn.backend)
    return attn.proj(y.reshape(N, Hq * D))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, backend=cfg.backend)
        self.mlp = MLP(cfg.d_model)

    def forward(self, x, cp_group=None, tree: TreeBatch | None = None):
        if tree is not None:
            x = x + _tree_attention(self.attn, self.ln1(x), tree)
        else:
            x = x + self.attn(self.ln1(x), cp_group=cp_group)
        return x + self.mlp(self.ln2(x))


class Trunk(nn.Module):
    """Embeddings, blocks and the final LayerNorm: idx [B, T] → h [B, T, d]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)   # W_e
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)   # W_p
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():       # GPT-2: scale residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, pos=None, cp_group=None, tree: TreeBatch | None = None):
        """``pos``: the tokens' positions (default 0..T−1); ``cp_group``: idx is this rank's zigzag
        part of every sequence (context parallelism: ring attention over the group); ``tree``: the
        packed tree batch instead of idx (→ h [N, d])."""
        if tree is not None:
            if tree.tokens and int(tree.pos.max()) >= self.cfg.block_size:
                raise ValueError(f"GPT: a tree position reaches {int(tree.pos.max())}, past "
                                 f"block_size={self.cfg.block_size}")
            x = self.wte(tree.idx) + self.wpe(tree.pos)
            for b in self.blocks:
                x = b(x, tree=tree)
            return self.ln_f(x)
        T = idx.shape[1]
        if pos is None:
            if T > self.cfg.block_size:
                raise ValueError(f"GPT: idx has {T} positions, more than block_size={self.cfg.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x, cp_group)
        return self.ln_f(x)


def cp_group(cfg: GPTConfig):
    """The context-parallel group (the whole world under torchrun) when ``cfg.context_parallel``
    is on and there is more than one rank, else None."""
    if cfg.context_parallel and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _no_cp(cfg: GPTConfig, what: str):
    if cp_group(cfg) is not None:
        raise ValueError(f"GPT: model.context_parallel splits sequences for the LM loss (the "
                         f"pretrain and sft stages); {what} runs without it: unset "
                         f"model.context_parallel for this stage")


class GPT(nn.Module):
    """Language model. ``forward(idx)`` → logits [B, T, V];
    ``forward(idx, targets, reduction=...)`` → LM loss via linear_cross_entropy (ignore −100)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)

    def forward(self, idx, targets=None, reduction: str = "mean", *, logprobs_of=None,
                temperature: float = 1.0, entropy: bool = False, tree: TreeBatch | None = None):
        """idx [B, T] → logits [B, T, V]; with ``targets``: the LM loss (linear_cross_entropy);
        with ``logprobs_of`` (tokens [B, T]): log π(token) [B, T] (and the entropy [B, T] with
        ``entropy=True``) of softmax(logits / temperature) straight from the hidden states
        (linear_token_logprobs: the fused backends never hold the [B, T, V] logits). With
        ``tree`` (idx unused): the trunk on the tree batch and ``logprobs_of`` = the tokens [M]
        of its taken positions → their log-probs [M] (``tree.scatter`` makes them [B, T])."""
        if tree is not None:
            if logprobs_of is None:
                raise ValueError("GPT: a tree batch gives log-probs only: pass logprobs_of")
            _no_cp(self.cfg, "the log-probs of PPO")
            h = self.trunk(None, tree=tree)[tree.rows]
            return ro.linear_token_logprobs(h, self.trunk.wte.weight, logprobs_of, temperature=temperature,
                                            return_entropy=entropy, backend=self.cfg.backend)
        if targets is not None and cp_group(self.cfg) is not None:
            return self._cp_lm_loss(idx, targets, reduction)
        h = self.trunk(idx)
        W_e = self.trunk.wte.weight
        if logprobs_of is not None:
            _no_cp(self.cfg, "the log-probs of PPO")
            return ro.linear_token_logprobs(h, W_e, logprobs_of, temperature=temperature,
                                            return_entropy=entropy, backend=self.cfg.backend)
        if targets is None:
            return F.linear(h, W_e)                   # logits = h·W_eᵀ (sampling)
        if self.cfg.vocab_parallel and dist.is_initialized() and dist.get_world_size() > 1:
            # vocabulary-parallel LM head: each rank's loss reads its rows of the tied W_e (every
            # rank holds the same batch); W_e's gradient is gathered whole on every rank
            W_r, off = split_replicated(W_e, dist.group.WORLD)
            return ro.linear_cross_entropy(h.reshape(-1, h.shape[-1]), W_r, targets.reshape(-1),
                                           reduction=reduction, backend=self.cfg.backend,
                                           process_group=dist.group.WORLD, vocab_offset=off)
        return ro.linear_cross_entropy(h.reshape(-1, h.shape[-1]), W_e, targets.reshape(-1),
                                       reduction=reduction, backend=self.cfg.backend)

    def _cp_lm_loss(self, idx, targets, reduction):
        """The LM loss with every sequence split zigzag over the ranks (T padded with ignored
        tokens to a multiple of 2W: causal attention keeps them out of the real ones). As a
        data-parallel rank's rows, "sum" and "none" give this rank's share (its tokens' losses;
        0 at the other ranks' tokens), so DDP's average of the ranks' gradients, with the loss
        scaled by the world size, is the gradient of the whole batch; "mean" is the mean over
        every token (one all_reduce; evaluation only)."""
        g = cp_group(self.cfg)
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"GPT: idx has {T} positions, more than block_size={self.cfg.block_size}")
        if reduction not in ("sum", "none", "mean"):
            raise ValueError(f"GPT: reduction must be 'sum', 'none' or 'mean', got {reduction!r}")
        two_w = 2 * dist.get_world_size(g)
        Tp = -(-T // two_w) * two_w
        if Tp > T:
            idx = torch.nn.functional.pad(idx, (0, Tp - T))
            targets = torch.nn.functional.pad(targets, (0, Tp - T), value=-100)
        pos = zigzag_split(torch.arange(Tp, device=idx.device), g, 0)
        h = self.trunk(zigzag_split(idx, g, 1), pos=pos.clamp(max=self.cfg.block_size - 1),
                       cp_group=g)
        tgt = zigzag_split(targets, g, 1)
        tok = ro.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.trunk.wte.weight,
                                      tgt.reshape(-1), reduction="none", backend=self.cfg.backend)
        if reduction == "sum":
            return tok.sum()
        if reduction == "none":                   # [B·T], this rank's tokens in place
            full = tok.new_zeros((B, Tp))
            full[:, pos] = tok.view(B, -1)
            return full[:, :T].reshape(-1)
        if torch.is_grad_enabled() and tok.requires_grad:
            raise ValueError("GPT: with model.context_parallel, reduction='mean' is for evaluation "
                             "(no grad); train with 'sum' or 'none' (this rank's share)")
        s = torch.stack([tok.sum(), (tgt != -100).sum().to(tok.dtype)])
        dist.all_reduce(s, group=g)
        return s[0] / s[1].clamp(min=1)

    # ------------------------------------------------------------------ generation ---
    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, lengths: torch.Tensor, max_new: int, *,
                 greedy: bool = False, temperature: float = 1.0, eos: int = 1, pad: int = 0,
                 generator: torch.Generator | None = None, padding_side: str = "right",
                 use_cache: bool = True, decode: str = "auto"):
        """Continue a batch of prompts [B, P] (row b has lengths[b] real tokens) by up to
        ``max_new`` tokens each; a row stops after its EOS.

        ``padding_side="right"``: row b's prompt is prompts[b, :L_b]; ``"left"``: prompts[b, P−L_b:].
        Returns (seq [B, P + max_new], resp_len [B]); seq keeps the prompt where it was and puts the
        response (EOS included) right after it, pad elsewhere: right padding gives
        [prompt, response, pad], left padding [pad, prompt, response, pad].

        ``use_cache=True`` (default) keeps each layer's keys and values (a KV cache, see
        ``_CachedDecoder``); ``use_cache=False`` recomputes the whole prefix for every new token
        (the reference the cache is tested against). ``decode`` picks how a step attends when the
        rows have different lengths: ``"varlen"`` (one ``attention_varlen`` call, no host sync),
        ``"grouped"`` (one dense call per group of rows of equal length) or ``"auto"``: varlen for
        CUDA tensors, grouped otherwise: on a CPU the reference varlen op gathers every sequence
        into a padded block per call (cpu-demo rollouts, tokens per CPU-second: no cache ≈ 12.5k,
        varlen 13–27k, grouped 29–32k).
        """
        if decode not in ("auto", "varlen", "grouped"):
            raise ValueError(f"generate: decode must be 'auto', 'varlen' or 'grouped', got {decode!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"generate: padding_side must be 'left' or 'right', got {padding_side!r}")
        B, P = prompts.shape
        dev = prompts.device
        if P + max_new > self.cfg.block_size:
            raise ValueError(f"generate: prompts width {P} + max_new {max_new} exceeds "
                             f"block_size={self.cfg.block_size}")
        lengths = lengths.to(dev)
        cols = torch.arange(P, device=dev)
        if padding_side == "left":               # left-align every row: token j of row b at column j
            x = prompts.gather(1, (cols[None, :] + (P - lengths)[:, None]) % max(P, 1))
        else:
            x = prompts
        if decode == "auto":
            decode = "varlen" if dev.type == "cuda" else "grouped"
        step = (_CachedDecoder(self, x, lengths, P + max_new, decode) if use_cache
                else _Recompute(self, x, lengths, P + max_new))
        resp = torch.full((B, max_new), pad, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        n = torch.zeros(B, dtype=torch.long, device=dev)             # response tokens so far
        logits = step.first_logits()                                 # [B, V] at each row's last token
        for i in range(max_new):
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            resp[:, i] = nxt
            n = n + (~done).long()
            done = done | (nxt == eos)
            if i + 1 == max_new or bool(done.all()):
                break
            logits = step.next_logits(nxt, ~done)
        seq = torch.full((B, P + max_new), pad, dtype=torch.long, device=dev)
        seq[:, :P] = prompts
        if padding_side == "left":               # every prompt ends at column P − 1
            seq[:, P:] = resp
        else:                                    # response token j of row b at column L_b + j
            seq.scatter_(1, lengths[:, None] + torch.arange(max_new, device=dev)[None, :], resp)
        return seq, n


class _Recompute:
    """Generation without a cache: every step runs the model over the whole prefix.

    Rows are left-aligned (row b: tokens at columns 0..L_b−1); causal attention means the pad after
    a row's end never influences it, so rows of different lengths share one forward."""

    def __init__(self, model: GPT, x, lengths, width: int):
        self.m, self.len = model, lengths.clone()
        self.seq = torch.zeros(x.shape[0], width, dtype=torch.long, device=x.device)
        self.seq[:, :x.shape[1]] = x
        self.rows = torch.arange(x.shape[0], device=x.device)

    def _logits(self):
        w = int(self.len.max())
        h = self.m.trunk(self.seq[:, :w])[self.rows, self.len - 1]
        return F.linear(h, self.m.trunk.wte.weight)   # the unembedding of the rows' last tokens

    def first_logits(self):
        return self._logits()

    def next_logits(self, tok, live):
        self.seq[self.rows, self.len.clamp(max=self.seq.shape[1] - 1)] = tok
        self.len = self.len + live.long()
        return self._logits()


class _CachedDecoder:
    """Generation with a KV cache: the prompt runs once (prefill), then each step feeds one token.

    Row b's cache holds its L_b tokens at the start of a dense buffer [B, S_max, Hkv, D] per layer
    (S_max = P + max_new). A decode step is one query per row against that row's L_b + 1 keys —
    the attention op's bottom-right causal alignment (query i sees keys j ≤ i + S − T) is exactly
    "the last query sees everything" for T = 1.

    * equal prompt lengths: every row advances in lockstep, so the step is the dense op
      ``attention(q [B, Hq, 1, D], k [B, Hkv, t+1, D])``; a row that has finished keeps computing
      (its tokens are discarded) rather than making the batch ragged.
    * mixed lengths: ``attention_varlen`` over 2B sequences that describe the dense cache without
      copying it or syncing with the host: sequence 2b is row b's L_b + 1 real keys, sequence
      2b+1 the gap up to the next row's start (no queries):
      cu_seqlens_k = [0, L_0+1, S, S+L_1+1, 2S, …, B·S], cu_seqlens_q = [0, 1, 1, 2, 2, …, B, B].
      A finished row stays where it is (its slot at L_b is rewritten each step, never read).
      ``decode="grouped"`` instead runs each group of rows of one length as its own lockstep batch
      (a host sync to form the groups; the choice on CPU tensors, see ``GPT.generate``).
    """

    def __init__(self, model: GPT, x, lengths, width: int, decode: str = "varlen"):
        self.m = model
        blocks = model.trunk.blocks
        B, P = x.shape
        a0 = blocks[0].attn if len(blocks) else None
        self.Hq = a0.n_heads if a0 is not None else 1
        self.Hkv = a0.n_kv_heads if a0 is not None else 1
        self.D = a0.head_dim if a0 is not None else 1
        dt = model.trunk.wte.weight.dtype
        dev = x.device
        self.S = width
        self.k = [torch.zeros(B, width, self.Hkv, self.D, dtype=dt, device=dev) for _ in blocks]
        self.v = [torch.zeros(B, width, self.Hkv, self.D, dtype=dt, device=dev) for _ in blocks]
        self.len = lengths.clone()
        self.rows = torch.arange(B, device=dev)
        # equal lengths: lockstep dense decode; otherwise varlen
        lo, hi = (int(lengths.min()), int(lengths.max())) if B else (0, 0)
        self.lockstep = lo == hi
        self.pos0 = hi if self.lockstep else None         # lockstep: the position being written
        self.groups = None                                # grouped: [(rows, position written)]
        if not self.lockstep and decode == "grouped":
            self.groups = [((lengths == L).nonzero().flatten(), L) for L in lengths.unique().tolist()]
        self.x = x
        self.P = P

    # -- one block's attention with the cache ------------------------------------------------
    def _qkv(self, attn, h):
        """The projections of CausalSelfAttention.forward: h [B, T, d] → q, k, v [B, T, H, D]."""
        B, T, _ = h.shape
        q, k, v = attn.qkv(h).split([self.Hq * self.D, self.Hkv * self.D, self.Hkv * self.D], dim=-1)
        return q.view(B, T, self.Hq, self.D), k.view(B, T, self.Hkv, self.D), v.view(B, T, self.Hkv, self.D)

    def _out(self, attn, y):                      # y [B, Hq, T, D] → [B, T, d]
        B, _, T, _ = y.shape
        return attn.proj(y.transpose(1, 2).reshape(B, T, self.Hq * self.D))

    def _run(self, tok, pos, attend):
        """The trunk over tokens tok [B, T] at positions pos ([T] or [B, T]); ``attend(l, attn, q,
        k, v)`` stores k, v in the cache and returns the attention output [B, Hq, T, D]."""
        t = self.m.trunk
        x = t.wte(tok) + t.wpe(pos)
        for l, blk in enumerate(t.blocks):
            q, k, v = self._qkv(blk.attn, blk.ln1(x))
            x = x + self._out(blk.attn, attend(l, blk.attn, q, k, v))
            x = x + blk.mlp(blk.ln2(x))
        return t.ln_f(x)

    def _logits(self, h):
        return F.linear(h, self.m.trunk.wte.weight)

    def first_logits(self):
        """Prefill: the left-aligned prompts [B, P] through the dense causal op (the pad after a
        row's end never reaches its real tokens); caches every position, returns each row's last."""
        P = self.P

        def attend(l, attn, q, k, v):
            self.k[l][:, :P], self.v[l][:, :P] = k, v
            return ro.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                backend=attn.backend)

        h = self._run(self.x, torch.arange(P, device=self.x.device), attend)
        return self._logits(h[self.rows, self.len - 1])

    def next_logits(self, tok, live):
        """Feed tok [B] (the token just chosen) at each row's next position; logits [B, V]."""
        if self.lockstep:
            pos = self.pos0

            def attend(l, attn, q, k, v):
                self.k[l][:, pos], self.v[l][:, pos] = k[:, 0], v[:, 0]
                return ro.attention(q.transpose(1, 2), self.k[l][:, :pos + 1].transpose(1, 2),
                                    self.v[l][:, :pos + 1].transpose(1, 2), causal=True, backend=attn.backend)

            h = self._run(tok[:, None], torch.tensor([pos], device=tok.device), attend)
            self.pos0 += 1
            return self._logits(h[:, 0])
        if self.groups is not None:
            return self._next_grouped(tok)
        return self._next_varlen(tok, live)

    def _next_grouped(self, tok):
        """Each group of rows of one length is a lockstep batch (dense op, one query per row).
        Every row advances each step, finished ones too, so a group keeps one length."""
        out = None
        for g, p in self.groups:

            def attend(l, attn, q, k, v, g=g, p=p):
                self.k[l][g, p], self.v[l][g, p] = k[:, 0], v[:, 0]
                return ro.attention(q.transpose(1, 2), self.k[l][g, :p + 1].transpose(1, 2),
                                    self.v[l][g, :p + 1].transpose(1, 2), causal=True, backend=attn.backend)

            lg = self._logits(self._run(tok[g, None], torch.tensor([p], device=tok.device), attend)[:, 0])
            out = lg.new_empty(tok.shape[0], lg.shape[-1]) if out is None else out
            out[g] = lg
        self.groups = [(g, p + 1) for g, p in self.groups]
        return out

    def _next_varlen(self, tok, live):
        B, S, L = tok.shape[0], self.S, self.len             # row b writes its new token at L_b
        pos = L.clamp(max=S - 1)
        b = self.rows
        start = b * S
        cu_k = torch.cat([torch.stack([start, start + pos + 1], 1).flatten(),
                          start.new_full((1,), B * S)]).to(torch.int32)
        cu_q = torch.cat([torch.stack([b, b + 1], 1).flatten(), b.new_full((1,), B)]).to(torch.int32)

        def attend(l, attn, q, k, v):
            self.k[l][b, pos], self.v[l][b, pos] = k[:, 0], v[:, 0]
            y = ro.attention_varlen(q[:, 0], self.k[l].view(B * S, self.Hkv, self.D),
                            self.v[l].view(B * S, self.Hkv, self.D), cu_q, cu_k, 1, S,
                            causal=True, backend=attn.backend)          # [B, Hq, D]
            return y[:, :, None]

        h = self._run(tok[:, None], pos[:, None], attend)
        self.len = L + live.long()
        return self._logits(h[:, 0])


class ScalarHeadGPT(nn.Module):
    """The trunk with a scalar head r = h·w + b in place of the unembedding.

    ``forward(idx)`` → per-token values [B, T] (PPO value model);
    ``forward(idx, last)`` → one reward per row read at token ``last[i]`` (reward model);
    ``forward(None, tree=tree)`` → the values [M] at the tree batch's taken positions.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_lm(cls, lm: GPT) -> "ScalarHeadGPT":
        m = cls(lm.cfg)
        m.trunk.load_state_dict(lm.trunk.state_dict())
        return m

    def forward(self, idx, last=None, tree: TreeBatch | None = None):
        _no_cp(self.cfg, "the reward / value model")
        if tree is not None:
            return self.head(self.trunk(None, tree=tree)[tree.rows]).squeeze(-1)
        h = self.trunk(idx)
        if last is None:
            return self.head(h).squeeze(-1)
        return ro.reward_at_last_token(h, last, self.head.weight, self.head.bias)


def frozen_copy(m: nn.Module) -> nn.Module:
    c = copy.deepcopy(m).eval()
    for p in c.parameters():
        p.requires_grad_(False)
    return c


def config_dict(cfg: GPTConfig) -> dict:
    return asdict(cfg)
