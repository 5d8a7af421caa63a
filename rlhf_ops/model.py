"""A minimal GPT in the notation of DESIGN.md, built on the rlhf_ops public ops.

    h_0 = U·W_e + W_p                       token embedding + learned positions
    h_l = block(h_{l−1}),  l = 1..n         pre-LN: x + attn(LN(x)), x + mlp(LN(x))
    P(u) = softmax(LN(h_n)·W_eᵀ)            unembedding tied to W_e

The LM loss never materialises a softmax here: it goes through ``rlhf_ops.linear_cross_entropy``.
``ScalarHeadGPT`` is the same trunk with the unembedding replaced by a scalar head: the reward model
reads it at each response's last real token, the PPO value model at every token.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import rlhf_ops as ro
from rlhf_ops.nn import CausalSelfAttention


@dataclass
class GPTConfig:
    vocab_size: int = 32
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    backend: str | None = None     # rlhf_ops backend for attention and the losses


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, backend=cfg.backend)
        self.mlp = MLP(cfg.d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
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

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"GPT: idx has {T} positions, more than block_size={self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)


class GPT(nn.Module):
    """Language model. ``forward(idx)`` → logits [B, T, V];
    ``forward(idx, targets, reduction=...)`` → LM loss via linear_cross_entropy (ignore −100)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)

    def forward(self, idx, targets=None, reduction: str = "mean"):
        h = self.trunk(idx)
        W_e = self.trunk.wte.weight
        if targets is None:
            return F.linear(h, W_e)                   # logits = h·W_eᵀ (sampling, KL)
        return ro.linear_cross_entropy(h.reshape(-1, h.shape[-1]), W_e, targets.reshape(-1),
                                       reduction=reduction, backend=self.cfg.backend)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, lengths: torch.Tensor, max_new: int, *,
                 greedy: bool = False, temperature: float = 1.0, eos: int = 1, pad: int = 0,
                 generator: torch.Generator | None = None):
        """Continue right-padded prompts [B, P] (row i has lengths[i] real tokens) by up to
        ``max_new`` tokens each; no KV cache. Because attention is causal, the pad after a row's
        end never influences it, so rows of different lengths decode in one batch.

        Returns (seq [B, P + max_new] right-padded, resp_len [B]) — the response includes EOS.
        """
        B = prompts.shape[0]
        dev = prompts.device
        if prompts.shape[1] + max_new > self.cfg.block_size:
            raise ValueError(f"generate: prompts width {prompts.shape[1]} + max_new {max_new} exceeds "
                             f"block_size={self.cfg.block_size}")
        seq = torch.full((B, prompts.shape[1] + max_new), pad, dtype=torch.long, device=dev)
        seq[:, :prompts.shape[1]] = prompts
        cur = lengths.clone().to(dev)                 # next position to write, per row
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)
        for _ in range(max_new):
            width = int(cur.max())
            logits = self(seq[:, :width])[rows, cur - 1]
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            seq[rows, cur] = nxt
            cur = cur + (~done).long()
            done = done | (nxt == eos)
            if bool(done.all()):
                break
        return seq, cur - lengths.to(dev)


class ScalarHeadGPT(nn.Module):
    """The trunk with a scalar head r = h·w + b in place of the unembedding.

    ``forward(idx)`` → per-token values [B, T] (PPO value model);
    ``forward(idx, last)`` → one reward per row read at token ``last[i]`` (reward model).
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

    def forward(self, idx, last=None):
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
