"""TRL (1.16) on rlhf_ops: the reward-model loss, a fused LM head (log-probs, entropy and TRL's
other per-token outputs), the GRPO and DPO losses, and the KL from stored reference log-probs.

    from rlhf_ops.integrations.trl import RewardTrainer          # TRL's, with rlhf_ops' loss
    trainer = RewardTrainer(model=apply_rlhf_ops(reward_model), args=RewardConfig(...), ...)

    from rlhf_ops.integrations.trl import FusedLMHeadMixin       # GRPO / RLOO / DPO / SFT / KTO
    class GRPOTrainer(FusedLMHeadMixin, trl.GRPOTrainer): pass

    from rlhf_ops.integrations.trl import add_fused_lm_head, per_token_kl
    add_fused_lm_head(policy, outputs=("log_probs", "entropy"))  # TRL's contract, every device
    out = policy(input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    kl = per_token_kl(out.log_probs, ref_log_probs)              # GRPO's k3 estimator

**Reward loss.** TRL's ``RewardTrainer`` minimises −log σ(r_chosen − r_rejected − margin), mean
over pairs, with an optional per-example ``margin`` column. ``RewardLossMixin.compute_loss``
computes it with ``rlhf_ops.pairwise_reward_loss`` (one prompt = one pair, ranks (0, 1), the
margin as a per-prompt tensor), keeps TRL's ``center_rewards_coefficient`` term and its metrics.
It also takes **K-wise ranked batches** (InstructGPT's K = 4..9 responses per prompt, all C(K, 2)
pairs of one prompt in one batch element): a dataset with columns ``responses_ids`` (K token
lists) and ``ranks`` (K ints, 0 = best, −1 = absent), optional ``margin``; collated by
``DataCollatorForRankedPreference`` into B·K right-padded rows plus ``ranks`` [B, K]; the loss is
``pairwise_reward_loss(rewards.view(B, K), ranks, margin=margin)``. ``RewardTrainer`` is TRL's
class with the mixin and the ranked-dataset handling.

**Fused LM head.** ``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)`` has
the contract of ``trl.trainer.utils.add_fused_lm_head``: afterwards ``model(..., labels=labels,
fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` whose ``log_probs`` [B, T − 1] (or [B, T]
with ``shift_labels``) is log softmax(logits / temperature)[next label], zero where the label is
−100, ``label_mask`` the labels ≠ −100, ``loss`` = −Σ log_probs / (num_items_in_batch or the
count), and — each when named in ``outputs`` — ``entropy`` (differentiable), ``mean_logits``
(mean over the vocabulary of logits / T), ``is_top1`` (the label is the first maximum of the
logits) and ``log_sum_sq_probs`` (log Σ p²), the last three without gradient. Log-probs,
entropy, top-1 and mean logits come from one sweep of ``rlhf_ops.linear_token_logprobs(...,
return_stats=...)`` on the positions that have a label (the [tokens, vocab] logits are never
formed), on every backend, the CPU included (TRL's own head has a Triton path on CUDA/XPU only);
``log_sum_sq_probs`` (DPO's WPO weighting only), when asked for, from a second pass over the
labelled rows' logits in blocks of ``STATS_BLOCK_BYTES`` that are reduced and
dropped (no gradient, nothing kept: one extra head GEMM in the forward). Without
``fused_lm_head=True`` the forward is the previous one (generation is unchanged). A
``logit_scale``-type multiplier is folded into the temperature; with Gemma-style
``final_logit_softcapping`` c the logits are c·tanh(scale·z/c) / T, as in TRL's head (the op's
``softcap=``; the scale then multiplies the hidden states and bias, before the cap). MoE router
losses are refused with an error.

**In TRL's trainers.** ``FusedLMHeadMixin`` makes a TRL trainer install this head wherever it
would install its own (the policy and the reference model, with the trainer's temperature and
outputs), and in ``GRPOTrainer`` / ``DPOTrainer`` returns the loss computed by
``rlhf_ops.policy_loss`` / ``preference_loss`` from the same per-token tensors
(``rlhf_ops.integrations._trl_losses``; TRL options they cannot represent raise at
construction); TRL's metrics stay TRL's. A one-time log line names the parts that are rlhf_ops'.
Without the mixin, a trainer installs TRL's own head on the model: then only the attention of a
model patched by ``apply_rlhf_ops`` is rlhf_ops' (and a warning says so).

**KL.** ``per_token_kl(logprobs, ref_logprobs, estimator="k3")`` is GRPO's per-token KL
exp(ref − logp) − (ref − logp) − 1 (= k3 of ``rlhf_ops.kl_from_logprobs``); k1/k2 as there.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
import types
from dataclasses import dataclass

import torch
import trl
from torch import Tensor
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import FusedCausalLMOutput

from .. import _backend
from ..kl import kl_from_logprobs
from ..logprobs import linear_token_logprobs
from ..reference import softcap_logits
from ..reward import pairwise_reward_loss
from . import _trl_losses
from .transformers import ATTN_IMPLEMENTATION, logit_transform

__all__ = ["reward_loss", "RewardLossMixin", "RewardTrainer", "DataCollatorForRankedPreference",
           "add_fused_lm_head", "FusedLMHeadMixin", "per_token_kl"]

TESTED_TRL = "1.16.0"
SUPPORTED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

logger = logging.getLogger(__name__)


def _err(msg: str) -> str:
    return f"rlhf_ops.integrations.trl: {msg}"


# ------------------------------------------------------------------------------ reward loss ---

def reward_loss(rewards_chosen: Tensor, rewards_rejected: Tensor, margin: Tensor | float | None = None,
                *, backend: str | None = None) -> Tensor:
    """TRL's reward loss, mean over pairs of −log σ(r_chosen − r_rejected − margin), through
    ``pairwise_reward_loss``: each pair is a prompt with two responses ranked (0, 1).
    rewards_* [B]; margin None, a float, or a tensor [B] (no gradient)."""
    if rewards_chosen.shape != rewards_rejected.shape or rewards_chosen.dim() != 1:
        raise ValueError(_err(f"reward_loss: rewards_chosen and rewards_rejected must both be [B], got "
                              f"{tuple(rewards_chosen.shape)} and {tuple(rewards_rejected.shape)}"))
    rewards = torch.stack([rewards_chosen, rewards_rejected], dim=1)
    ranks = torch.tensor([0, 1], device=rewards.device).expand(rewards.shape[0], 2)
    if isinstance(margin, Tensor):
        margin = margin.to(device=rewards.device, dtype=rewards.dtype)
    return pairwise_reward_loss(rewards, ranks, margin=0.0 if margin is None else margin,
                                backend=backend)


@dataclass
class DataCollatorForRankedPreference(DataCollatorMixin):
    """K-wise ranked examples ``{"responses_ids": [K lists of ids], "ranks": [K ints], "margin"?}``
    → ``input_ids`` / ``attention_mask`` [B·K, L] (right-padded; row b·K + j is response j of
    example b; a prompt with fewer than K responses gets one-pad-token rows, rank −1), ``ranks``
    [B, K] int64 and, when the examples have it, ``margin`` [B] float."""
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples):
        K = max(len(ex["responses_ids"]) for ex in examples)
        rows, ranks = [], []
        for ex in examples:
            resp, rk = list(ex["responses_ids"]), list(ex["ranks"])
            if len(resp) != len(rk):
                raise ValueError(_err(f"an example has {len(resp)} responses_ids but {len(rk)} ranks"))
            rows += [list(r) for r in resp] + [[]] * (K - len(resp))
            ranks.append(rk + [-1] * (K - len(rk)))
        L = max(1, max(len(r) for r in rows))
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "ranks": torch.tensor(ranks, dtype=torch.long)}
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([float(ex["margin"]) for ex in examples])
        return out


class RewardLossMixin:
    """``compute_loss`` for TRL's ``RewardTrainer`` through ``rlhf_ops.pairwise_reward_loss``:
    chosen/rejected batches (TRL's collator: first half chosen, second half rejected, optional
    ``margin`` [B]) and K-wise ranked batches (``ranks`` [B, K]). Set ``rlhf_ops_backend`` on
    the trainer to pick the backend (default: rlhf_ops' choice)."""

    rlhf_ops_backend: str | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        ranks = inputs.pop("ranks", None)
        margin = inputs.pop("margin", None)
        inputs["use_cache"] = False
        outputs = model(**inputs)
        scores = outputs.logits.squeeze(-1)                       # [rows]
        if ranks is None:
            chosen, rejected = torch.chunk(scores, chunks=2)
            rewards = torch.stack([chosen, rejected], dim=1)      # [B, 2]
            ranks = torch.tensor([0, 1], device=scores.device).expand(rewards.shape[0], 2)
        else:
            rewards = scores.view(ranks.shape)                    # [B, K]
        if isinstance(margin, Tensor):
            margin = margin.to(device=rewards.device, dtype=rewards.dtype)
        loss = pairwise_reward_loss(rewards, ranks, margin=0.0 if margin is None else margin,
                                    backend=self.rlhf_ops_backend)
        if self.args.center_rewards_coefficient is not None:
            # TRL: coef · mean over pairs of (r_chosen + r_rejected)²; for K responses, the sum
            # becomes (2 / n_b) Σ_i r_bi over the n_b present responses (the same at K = 2)
            present = (ranks >= 0).to(rewards.dtype)
            centre = 2 * (rewards * present).sum(1) / present.sum(1).clamp(min=1)
            loss = loss + self.args.center_rewards_coefficient * (centre ** 2).mean()
        self._log_reward_metrics(mode, inputs, rewards.detach(), ranks)
        return (loss, outputs) if return_outputs else loss

    def _log_reward_metrics(self, mode, inputs, rewards, ranks):
        # TRL's metrics (tokens, min/mean/max reward, pair accuracy and margin) over the ordered
        # pairs (i, j) with ranks[i] < ranks[j] of each prompt.
        if mode == "train":
            n = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        present = ranks >= 0
        flat = self.accelerator.gather(rewards[present])
        self._metrics[mode]["min_reward"].append(flat.min().item())
        self._metrics[mode]["mean_reward"].append(flat.mean().item())
        self._metrics[mode]["max_reward"].append(flat.max().item())
        pair = (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]
        gap = (rewards[:, :, None] - rewards[:, None, :])[pair]
        if gap.numel():
            acc = self.accelerator.gather_for_metrics((gap > 0).float().mean()).mean().item()
            self._metrics[mode]["accuracy"].append(acc)
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(gap.mean()).mean().item())


class RewardTrainer(RewardLossMixin, trl.RewardTrainer):
    """TRL's ``RewardTrainer`` with rlhf_ops' loss (``RewardLossMixin``) that also accepts K-wise
    ranked datasets (``responses_ids`` + ``ranks`` columns, pre-tokenised). ``rlhf_ops_backend``:
    the backend of the loss. The model's attention is the model's: call ``apply_rlhf_ops(model)``
    (rlhf_ops.integrations.transformers) to run it on rlhf_ops too."""

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, *a,
                 rlhf_ops_backend: str | None = None, **kw):
        if rlhf_ops_backend is not None:
            _backend.check_name(rlhf_ops_backend)
        self.rlhf_ops_backend = rlhf_ops_backend
        if data_collator is None and _is_ranked(train_dataset):
            pc = kw.get("processing_class", a[1] if len(a) > 1 else None)   # after eval_dataset
            pad = getattr(args, "pad_token", None) if args is not None else None
            pad_id = (pc.convert_tokens_to_ids(pad) if pad is not None and pc is not None else
                      (pc.pad_token_id if pc is not None and pc.pad_token_id is not None else
                       getattr(pc, "eos_token_id", None)))
            if pad_id is None:
                raise ValueError(_err("a ranked dataset needs a processing_class with a pad or eos "
                                      "token (or pass data_collator=DataCollatorForRankedPreference(...))"))
            data_collator = DataCollatorForRankedPreference(
                pad_token_id=pad_id,
                pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None)
                if isinstance(getattr(args, "pad_to_multiple_of", None), int) else None)
        super().__init__(model, args, data_collator, train_dataset, *a, **kw)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not _is_ranked(dataset):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None:
            dataset = dataset.filter(lambda ex: all(len(r) <= args.max_length
                                                    for r in ex["responses_ids"]))
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "responses_ids", "ranks"]


def _is_ranked(dataset) -> bool:
    names = getattr(dataset, "column_names", None) or []
    return "responses_ids" in names and "ranks" in names


# ---------------------------------------------------------------------------- fused LM head ---

# Bytes of one block of logits of the second pass that TRL's log_sum_sq_probs needs.
STATS_BLOCK_BYTES = 64 << 20

# While a FusedLMHeadMixin trainer computes its loss, the fused heads append their outputs here.
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("rlhf_ops_fused_lm_head",
                                                                      default=None)


def _log_sum_sq_probs(h: Tensor, w: Tensor, b: Tensor | None, temperature: float,
                      softcap: float = 0.0) -> Tensor:
    """log Σ_j p_j² = logsumexp(2y) − 2·logsumexp(y) with y = (h Wᵀ + b) / T (soft-capped before
    the temperature when ``softcap`` > 0), for the rows h
    [n, d] (no gradient), from a second pass over their logits in row blocks of
    STATS_BLOCK_BYTES (a block is dropped once reduced; nothing is kept for backward). Only
    DPO's WPO weighting asks for it."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    n, V = h.shape[0], w.shape[0]
    out = torch.empty(n, dtype=acc, device=h.device)
    step = max(1, STATS_BLOCK_BYTES // (max(V, 1) * torch.finfo(acc).bits // 8))
    with torch.no_grad():
        for s in range(0, n, step):
            y = softcap_logits(torch.nn.functional.linear(h[s:s + step], w, b).to(acc), softcap) / temperature
            out[s:s + step] = torch.logsumexp(2 * y, -1) - 2 * torch.logsumexp(y, -1)
    return out


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, backend: str | None = None) -> None:
    """TRL's ``add_fused_lm_head`` contract on ``rlhf_ops.linear_token_logprobs`` (module
    docstring): ``model(..., labels=labels, fused_lm_head=True)`` → ``FusedCausalLMOutput`` with
    per-token log-probs (and the other ``outputs``) without the [tokens, vocab] logits; patches
    this instance."""
    outputs = tuple(outputs)
    bad = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if bad:
        raise ValueError(_err(f"add_fused_lm_head: outputs {bad} are not supported; rlhf_ops computes "
                              f"{SUPPORTED_OUTPUTS}"))
    if backend is not None:
        _backend.check_name(backend)
    text_config = model.config.get_text_config()
    scale, softcap = logit_transform(text_config)
    softcap = 0.0 if softcap is None else float(softcap)
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(_err("add_fused_lm_head: MoE models with output_router_logits (a "
                              "load-balancing loss) are not supported"))
    if not scale > 0:
        raise ValueError(_err(f"add_fused_lm_head: a logit scale of {scale} cannot be folded into the "
                              f"temperature (it must be > 0)"))
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(_err(f"add_fused_lm_head: temperature must be a number > 0, got {temperature!r}"))
    # logits·scale / T = logits / (T / scale); with a softcap c·tanh(scale·z/c) / T the scale
    # multiplies hidden and bias instead (it acts before the cap)
    eff_temperature = float(temperature) if softcap > 0 else float(temperature) / scale
    h_scale = scale if softcap > 0 else 1.0
    want_entropy = "entropy" in outputs
    want_stats = "is_top1" in outputs or "mean_logits" in outputs
    previous = model.forward

    @functools.wraps(type(model).forward)                 # generate() validates kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for k, v in (("labels", labels), ("shift_labels", shift_labels),
                         ("num_items_in_batch", num_items_in_batch)):
                if v is not None:
                    kwargs[k] = v
            return previous(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError(_err("fused_lm_head=True needs labels (or shift_labels)"))
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:                          # position t scores label t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        if cast_lm_head_to_fp32:
            dt = torch.float32
        elif torch.is_autocast_enabled(hidden.device.type):
            dt = torch.get_autocast_dtype(hidden.device.type)   # what the nn.Linear head would use
        else:
            dt = weight.dtype
        h, w = hidden[mask].to(dt), weight.to(dt)
        b = None if bias is None else bias.to(dt)
        if h_scale != 1.0:
            h, b = h * h_scale, (None if b is None else b * h_scale)
        targets = labels[mask]
        _backend.require("linear_token_logprobs", backend, h.device, exact=True,
                         where=_err("add_fused_lm_head"), dtype=h.dtype)
        with torch.autocast(h.device.type, enabled=False):
            # log-probs, entropy, top-1 and mean logit in one sweep (linear_token_logprobs)
            res = linear_token_logprobs(h, w, targets, bias=b, temperature=eff_temperature,
                                        return_entropy=want_entropy, return_stats=want_stats,
                                        softcap=softcap, backend=backend)
            res = list(res) if isinstance(res, tuple) else [res]
            got = {"log_probs": res.pop(0), "entropy": res.pop(0) if want_entropy else None}
            if want_stats:
                got["is_top1"], got["mean_logits"] = res
            if "log_sum_sq_probs" in outputs:
                got["log_sum_sq_probs"] = _log_sum_sq_probs(h, w, b, eff_temperature, softcap)
        # scatter back to [B, T'] with zeros at ignored labels; masked_scatter keeps an all-ignored
        # batch connected to the graph (a differentiable zero), as TRL's head does
        per_token = {k: v.new_zeros(mask.shape).masked_scatter(mask, v)
                     for k, v in got.items() if v is not None and k in outputs + ("log_probs",)}
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        if isinstance(denom, Tensor):
            denom = denom.to(per_token["log_probs"].device)
        out = FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / denom, label_mask=mask,
                                  **per_token)
        record = _RECORD.get()
        if record is not None:
            record.append(out)
        return out

    forward._rlhf_ops_fused_lm_head = True
    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def _swapped(name: str, value, modules):
    saved = [(m, getattr(m, name)) for m in modules]
    try:
        for m, _ in saved:
            setattr(m, name, value)
        yield
    finally:
        for m, old in saved:
            setattr(m, name, old)


@contextlib.contextmanager
def _recording():
    """The FusedCausalLMOutputs of every fused head call inside the block, in call order."""
    record = []
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


# What rlhf_ops computes inside each TRL trainer with FusedLMHeadMixin (the rest is TRL's:
# generation, rewards, advantages, metrics, the optimizer). Printed once per trainer class.
_PARTS = {
    "GRPOTrainer": ("LM head of the policy (log-probs, entropy) and of the reference model "
                    "(log-probs): rlhf_ops.linear_token_logprobs; loss: rlhf_ops.policy_loss with "
                    "TRL's options (rlhf_ops.integrations._trl_losses.grpo_loss)"),
    "RLOOTrainer": ("LM head of the policy (log-probs, entropy) and of the reference model "
                    "(log-probs): rlhf_ops.linear_token_logprobs; loss: TRL's"),
    "DPOTrainer": ("LM head of the policy (log-probs, entropy, mean logits, top-1) and of the "
                   "reference model (log-probs): rlhf_ops.linear_token_logprobs; loss: "
                   "rlhf_ops.preference_loss with TRL's options "
                   "(rlhf_ops.integrations._trl_losses.dpo_loss)"),
    "KTOTrainer": ("LM head of the policy (log-probs, entropy, mean logits) and of the reference "
                   "model (log-probs): rlhf_ops.linear_token_logprobs; loss: TRL's"),
    "SFTTrainer": ("LM head (log-probs, entropy, top-1): rlhf_ops.linear_token_logprobs, so the "
                   "NLL loss is rlhf_ops'"),
}
_LOGGED: set = set()


def _trl_base(trainer) -> str | None:
    """The TRL trainer class name the trainer derives from (GRPOTrainer, DPOTrainer, ...)."""
    for c in type(trainer).__mro__:
        if c.__module__.startswith("trl.") and c.__name__ in _PARTS:
            return c.__name__
    return None


class FusedLMHeadMixin:
    """Put before a TRL trainer class (GRPO, RLOO, DPO, SFT, KTO): wherever that trainer's
    ``__init__`` installs TRL's fused LM head (on the policy and the reference model, with its
    temperature, fp32 cast and outputs), rlhf_ops' ``add_fused_lm_head`` is installed instead; the
    swap of the module-level name lasts for the ``__init__`` call only. In GRPOTrainer and
    DPOTrainer the loss is computed by ``rlhf_ops.policy_loss`` / ``preference_loss`` from the
    same tensors (``rlhf_ops.integrations._trl_losses``): TRL options they cannot represent raise
    here, at construction. TRL's metrics are unchanged. ``rlhf_ops_backend=`` (keyword) picks the
    backend. One log line says which parts are rlhf_ops'."""

    def __init__(self, *args, rlhf_ops_backend: str | None = None, **kwargs):
        if rlhf_ops_backend is not None:
            _backend.check_name(rlhf_ops_backend)
        self.rlhf_ops_backend = rlhf_ops_backend
        modules = [sys.modules[c.__module__] for c in type(self).__mro__
                   if c.__module__.startswith("trl.")
                   and hasattr(sys.modules[c.__module__], "add_fused_lm_head")]
        if not modules:
            raise TypeError(_err(f"FusedLMHeadMixin: {type(self).__name__} derives from no TRL trainer "
                                 f"that installs a fused LM head (TRL {TESTED_TRL} does so in GRPO, "
                                 f"RLOO, DPO, SFT and KTO)"))
        ours = functools.partial(add_fused_lm_head, backend=rlhf_ops_backend)
        with _swapped("add_fused_lm_head", ours, modules):
            super().__init__(*args, **kwargs)
        base = _trl_base(self)
        if base == "GRPOTrainer":
            _trl_losses.grpo_loss_kwargs(self.args)        # raises for what it cannot represent
        elif base == "DPOTrainer":
            _trl_losses.dpo_loss_kwargs(self.args)
        _log_parts(self, base)

    def _compute_loss(self, model, inputs, *args, **kwargs):
        base = _trl_base(self)
        if base == "GRPOTrainer":
            return self._rlhf_ops_grpo_loss(model, inputs)
        if base == "DPOTrainer":
            return self._rlhf_ops_dpo_loss(model, inputs, *args, **kwargs)
        return super()._compute_loss(model, inputs, *args, **kwargs)

    def _rlhf_ops_grpo_loss(self, model, inputs):
        """TRL's _compute_loss runs (its metrics); the loss returned is policy_loss's on the
        per-token log-probs and entropies it computed."""
        seen = []
        own = self._get_per_token_logps_and_entropies

        def capture(*a, **kw):
            seen.append(own(*a, **kw))
            return seen[-1]

        self._get_per_token_logps_and_entropies = capture
        try:
            super()._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies
        logps, entropies, _ = seen[-1]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        return _trl_losses.grpo_loss(
            self.args, logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask,
            sampling_per_token_logps=inputs.get("sampling_per_token_logps"),
            ref_per_token_logps=inputs.get("ref_per_token_logps"), entropies=entropies,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            training=self.model.training)

    def _rlhf_ops_dpo_loss(self, model, inputs, return_outputs=False):
        """TRL's _compute_loss runs (its metrics); the loss returned is preference_loss's on the
        log-probs of the fused heads it called: the policy first, then (unless the reference
        log-probs come with the batch) the reference model."""
        with _recording() as calls:
            res = super()._compute_loss(model, inputs, return_outputs)
        completion_mask = inputs["completion_mask"]
        T = completion_mask.shape[1] - 1
        if self.precompute_ref_logps:
            ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_c, ref_r = calls[1].log_probs[:, -T:].sum(1).chunk(2)
        loss = _trl_losses.dpo_loss(self.args, calls[0].log_probs[:, -T:], ref_c, ref_r,
                                    completion_mask)
        return (loss, res[1]) if return_outputs else loss


def _log_parts(trainer, base) -> None:
    name = type(trainer).__name__
    attn = getattr(trainer.model.config, "_attn_implementation", None)
    line = _err(f"in {name} ({base}), rlhf_ops computes: {_PARTS.get(base, 'the fused LM head')}; "
                f"attention: {'rlhf_ops' if attn == ATTN_IMPLEMENTATION else repr(attn)}"
                f"{'' if attn == ATTN_IMPLEMENTATION else ' (apply_rlhf_ops(model) runs it on rlhf_ops)'}; "
                f"backend: {trainer.rlhf_ops_backend or 'auto'}. Everything else is TRL's.")
    if line not in _LOGGED:
        _LOGGED.add(line)
        logger.warning(line)


# ---------------------------------------------------------------------------------------- KL ---

def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k3",
                 mask: Tensor | None = None) -> Tensor:
    """Per-token KL(π‖π_ref) estimate from stored log-probs via ``rlhf_ops.kl_from_logprobs``;
    ``estimator="k3"`` is GRPO's exp(ref − logp) − (ref − logp) − 1. Differentiable w.r.t.
    ``logprobs``; ``mask`` zeros the masked positions. fp32 (fp64 for fp64 inputs)."""
    res = kl_from_logprobs(logprobs, ref_logprobs, beta=1.0, estimator=estimator)
    kl = res.kl
    return kl if mask is None else kl * mask.to(kl.dtype)
