"""rlhf_ops: fused Triton and CUDA kernels for the four InstructGPT stages.

    import rlhf_ops as ro
    loss = ro.cross_entropy(logits, target)                 # pretraining / SFT (L1, L2)
    loss = ro.linear_cross_entropy(hidden, W_e, target)     # ... without [N, V] logits
    out  = ro.attention(q, k, v, causal=True)               # every stage
    loss = ro.pairwise_reward_loss(rewards, ranks)          # reward modelling
    lp   = ro.token_logprobs(logits, tokens)                # PPO
    lp, ent = ro.linear_token_logprobs(hidden, W, tokens, return_entropy=True)  # ... without logits
    res  = ro.kl_penalty(logits, ref_logits, tokens, beta=0.02)

Backends: ``reference`` (eager PyTorch), ``triton``, ``cuda`` (the built extension), ``auto``;
see ``available_backends()`` and ``use_backend()``.
"""
from ._backend import available_backends, use_backend
from .batch_invariant import ParityReport, batch_invariant, is_batch_invariant, logprob_parity
from .attention import attention, attention_tree, attention_varlen
from .cross_entropy import cross_entropy, linear_cross_entropy
from .kl import kl_from_logprobs, kl_penalty, ppo_rewards
from .logprobs import linear_token_logprobs, token_logprobs
from .losses import (PolicyLoss, PreferenceLoss, gae, group_advantages, policy_loss, preference_loss,
                     sequence_logprobs, value_loss)
from .padding import pad, unpad
from .reference import KLPenalty
from .reward import pairwise_reward_loss, reward_at_last_token

__version__ = "0.1.0"

__all__ = [
    "available_backends", "use_backend", "attention", "attention_varlen", "attention_tree", "unpad", "pad",
    "cross_entropy", "linear_cross_entropy",
    "pairwise_reward_loss", "reward_at_last_token", "token_logprobs", "kl_penalty", "ppo_rewards",
    "linear_token_logprobs", "kl_from_logprobs",
    "KLPenalty",
    "policy_loss", "value_loss", "gae", "group_advantages", "sequence_logprobs", "preference_loss",
    "PolicyLoss", "PreferenceLoss",
    "batch_invariant", "is_batch_invariant", "logprob_parity", "ParityReport",
]
