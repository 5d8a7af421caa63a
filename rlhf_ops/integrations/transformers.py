"""One line to run a Hugging Face transformers model on rlhf_ops: attention and the LM loss.

    import rlhf_ops.integrations.transformers     # registers attn_implementation="rlhf_ops"
    from rlhf_ops.integrations.transformers import apply_rlhf_ops, remove_rlhf_ops
    model = apply_rlhf_ops(model)                 # in place, this instance only; returns model
    loss = model(input_ids, attention_mask=mask, labels=labels).loss     # training: .logits is None
    remove_rlhf_ops(model)                        # back to the original, bit for bit

    # entry points that load: the same patch from a path or a config (no download needed)
    model = AutoRlhfOpsModelForCausalLM.from_pretrained(path)      # or .from_config(config)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="rlhf_ops")  # attention only

Tested families (``SUPPORTED_FAMILIES``): Llama, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3 (text),
GPT-2, Phi-3, OLMo-2, Granite, and the MoE families Qwen2-MoE, Qwen3-MoE, Mixtral; any head
class of them — causal LM, sequence classification (reward models), the bare model.

* **attention** (``attention=True``): every attention layer runs ``rlhf_ops.attention`` /
  ``attention_varlen`` through the flash-attn-style wrappers of ``rlhf_ops.integrations.flash``.
  A padded batch (left, right or mixed padding, from ``attention_mask``) runs as packed
  sequences: each row is reordered, real tokens first, and cut into three segments — its real
  queries with its real keys, its padding queries with no key (they output zeros), its padding
  keys with no query — so shapes are static and nothing is read on the host. A packed batch —
  ``cu_seq_lens_q/k`` + ``max_length_q/k`` (TRL's padding-free collator and
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` give them), or ``position_ids``
  that restart inside a row without an ``attention_mask`` — runs as one varlen call, each sequence
  seeing only itself; a batch without padding runs the dense kernel. Sliding windows (Mistral,
  Gemma-2/3, Qwen2/3, Phi-3, MoE ``layer_types``), score softcap, GQA and the KV cache of
  ``generate`` (dynamic or static) are handled as flash-attn does them. The attention
  probabilities are never materialised; under autocast attention runs in the autocast dtype.
  Packing from ``position_ids`` follows transformers' eager rule — a new sequence starts at each
  row start and wherever the position does not grow by exactly 1 — whenever no
  ``attention_mask`` is given (eager applies it only without a cache object, so pass
  ``use_cache=False`` to an eager baseline). Padding query rows output zeros (flash-attn's
  convention; eager fills them with something meaningless): a label scored from a padding
  position — the first real token after left padding — differs from eager; mask it, as prompts are.
* **loss** (``loss=True``, causal-LM heads only), as Liger-Kernel does it: in training mode, when
  the forward gets ``labels``, the loss is ``rlhf_ops.linear_cross_entropy`` of the final hidden
  states and the LM-head weight (tied or not; Granite's ``logits_scaling`` folded into the hidden
  states; Gemma-2/3's ``final_logit_softcapping`` as its ``softcap=``, c·tanh(logits/c) before the
  softmax; MoE router load-balancing loss added as the model adds it) — the [tokens, vocab] logits
  are never formed and **the output's ``logits`` is None** — with transformers' semantics: labels
  shifted by one (``shift_labels``, when given with them, are used as they are), ``ignore_index``
  (default −100), ``num_items_in_batch`` (the loss is the sum divided by it, as the Trainer's
  gradient accumulation expects), else the mean over non-ignored tokens — except that a batch
  without any non-ignored token gives 0 (not NaN). In eval mode (``model.eval()``, as
  ``Trainer.evaluate`` / ``predict`` run it), without labels, or with ``skip_logits=False``, the
  forward is the model's own — logits and the model's own loss — so ``compute_metrics``,
  inference and ``generate`` see logits; ``skip_logits=True`` fuses in eval mode too. Other heads
  (sequence classification, the bare model) keep their own loss: ``loss=True`` does nothing for
  them (``rlhf_ops_status(model)`` says what is patched).

How, and what stays untouched. The model's config objects are replaced, on this model's modules
only, by *views*: objects of a subclass of the config class that share the original's attribute
dict (so reads and writes go to the original) but report ``_attn_implementation ==
"rlhf_ops"``; setting the attention implementation through them (``config._attn_implementation
= ...``, ``model.set_attn_implementation(...)``) raises until ``remove_rlhf_ops``. Two models
built from one config object therefore stay independent. The LM loss is an instance-level
``forward``. The only process-wide effect is that the name "rlhf_ops" is registered in
transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (the mask function returns the
2-D padding mask); no existing entry, class or function is modified. A model *created* with
``attn_implementation="rlhf_ops"`` (TRL does so for a reference model copied from a patched
policy; ``model_init_kwargs={"attn_implementation": "rlhf_ops"}`` in a TRL config) runs its
attention through rlhf_ops on the default backend, without the fused loss; its family is checked
at the first forward as ``apply_rlhf_ops`` checks it. ``remove_rlhf_ops`` restores the original
config objects and forward. ``copy.deepcopy`` of a patched model gives a patched copy; pickling
a patched model object is not supported (``save_pretrained`` is). When something replaces the
forward of a patched model afterwards (TRL's trainers install their own fused LM head), a
one-time warning says that its loss is no longer rlhf_ops'.

Errors instead of silent fallbacks: a model family that is not supported; attention dropout > 0
in training mode; ``output_attentions=True``; a 4-D (custom)
attention mask; attention sinks; ``logits_to_keep`` together with a fused loss; bf16 on the Triton
backend under the CPU interpreter.

Host syncs and ``torch.compile``. Padded batches, ``cu_seq_lens`` batches and batches without
either need no host read: ``torch.compile(model, fullgraph=True, dynamic=True)`` gives one
graph for them. Finding sequence boundaries in ``position_ids`` alone needs one host read per
forward in eager mode (as transformers' own FlashAttention-2 path); under ``torch.compile`` the
boundaries cannot be read, so such a batch must bring ``cu_seq_lens_q/k`` and
``max_length_q/k``: a ``position_ids`` batch that restarts inside a row raises there (a device
assertion, no host sync) instead of attending across sequences.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import (CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast,
                                           MoeCausalLMOutputWithPast)
from transformers.modeling_utils import AttentionInterface

from .. import _backend
from ..cross_entropy import linear_cross_entropy
from .flash import flash_attn_func, flash_attn_varlen_func

__all__ = ["apply_rlhf_ops", "remove_rlhf_ops", "rlhf_ops_status", "AutoRlhfOpsModelForCausalLM",
           "ATTN_IMPLEMENTATION", "SUPPORTED_FAMILIES", "logit_transform"]

logger = logging.getLogger(__name__)

# No "flash" in the name: transformers would try to load a flash-attn kernel for a model created
# with it (TRL builds reference models with the policy's attn_implementation).
ATTN_IMPLEMENTATION = "rlhf_ops"

# model_type → the causal-LM class whose forward the fused loss replaces (and its output type).
# Each was validated against the unpatched model (tests/test_integrations_transformers.py).
SUPPORTED_FAMILIES = {
    "llama": ("LlamaForCausalLM", CausalLMOutputWithPast),
    "mistral": ("MistralForCausalLM", CausalLMOutputWithPast),
    "qwen2": ("Qwen2ForCausalLM", CausalLMOutputWithPast),
    "qwen3": ("Qwen3ForCausalLM", CausalLMOutputWithPast),
    "gemma2": ("Gemma2ForCausalLM", CausalLMOutputWithPast),
    "gemma3_text": ("Gemma3ForCausalLM", CausalLMOutputWithPast),
    "gpt2": ("GPT2LMHeadModel", CausalLMOutputWithCrossAttentions),
    "phi3": ("Phi3ForCausalLM", CausalLMOutputWithPast),
    "olmo2": ("Olmo2ForCausalLM", CausalLMOutputWithPast),
    "granite": ("GraniteForCausalLM", CausalLMOutputWithPast),
    "qwen2_moe": ("Qwen2MoeForCausalLM", MoeCausalLMOutputWithPast),
    "qwen3_moe": ("Qwen3MoeForCausalLM", MoeCausalLMOutputWithPast),
    "mixtral": ("MixtralForCausalLM", MoeCausalLMOutputWithPast),
}


def _err(msg: str) -> str:
    return f"rlhf_ops.integrations.transformers: {msg}"


def logit_transform(text_config) -> tuple[float, float | None]:
    """(scale, softcap) of a model's logits: logits = c·tanh(scale·(h Wᵀ + b) / c) with c = softcap,
    or scale·(h Wᵀ + b) when softcap is None. The scale is read as TRL's fused head reads it:
    ``logit_scale`` / ``output_multiplier`` / ``lm_head_multiplier`` multiply, Granite's
    ``logits_scaling`` divides (HyperCLOVA X's multiplies)."""
    s = getattr(text_config, "logit_scale", None)
    if s is None:
        s = getattr(text_config, "output_multiplier", None)
    if s is None:
        s = getattr(text_config, "lm_head_multiplier", None)
    if s is None and getattr(text_config, "logits_scaling", None) is not None:
        ls = text_config.logits_scaling
        s = ls if text_config.model_type == "hyperclovax" else 1 / ls
    return (1.0 if s is None else float(s)), getattr(text_config, "final_logit_softcapping", None)


# ------------------------------------------------------------------------------ per-model state ---

class _Memo:
    """``compute()`` once per (tensor, in-place version, key): every layer of one forward passes the
    same mask / position_ids object, so the layout is built once per forward. Holds weak
    references only; bypassed under torch.compile (the traced graph computes it once per call)."""

    def __init__(self):
        self._items = []                                   # [(weakref, version, key, value)]

    def __call__(self, t: Tensor, key, compute):
        if torch.compiler.is_compiling():
            return compute()
        ver = t._version
        for ref, v, k, val in self._items:
            if ref() is t and v == ver and k == key:
                return val
        val = compute()
        self._items.append((weakref.ref(t), ver, key, val))
        del self._items[:-4]
        return val


_CREATED_MEMO = _Memo()     # for models created with attn_implementation="rlhf_ops" (no state)


@dataclass(eq=False)
class _State:
    backend: str | None
    attention: bool
    loss: bool
    family: str
    model: object = None                               # weakref to the patched model
    rebound: list = field(default_factory=list)        # (module, original config)
    forward: object = None                             # our instance forward, when loss is patched
    prev_forward: object = None                        # the instance forward we replaced, if any
    had_prev_forward: bool = False
    warned_forward: bool = False
    memo: _Memo = field(default_factory=_Memo)


def _state_of(module) -> _State | None:
    return getattr(module, "_rlhf_ops", None)


# --------------------------------------------------------------------------- config views ---

_VIEW_CLASSES: dict[type, type] = {}


def _view_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``_attn_implementation`` (and the ``_internal`` attribute that
    ``set_attn_implementation`` writes) reads ours and refuses writes — on views only. A view is
    marked in a slot of its own (its attribute dict is the original's); an instance the class
    builds itself (``type(config)()``, as transformers does for the defaults) is an ordinary
    config of ``cls``."""
    if cls not in _VIEW_CLASSES:
        base_attn = cls._attn_implementation                  # the config class's own property

        def _is_view(self) -> bool:
            return getattr(self, "_rlhf_ops_view", False)

        def _refuse(self, value):
            raise RuntimeError(_err(f"this model is patched by apply_rlhf_ops (attention "
                                    f"{ATTN_IMPLEMENTATION!r}); call remove_rlhf_ops(model) before "
                                    f"setting its attention implementation to {value!r}"))

        def get_attn(self):
            return ATTN_IMPLEMENTATION if _is_view(self) else base_attn.fget(self)

        def set_attn(self, value):
            _refuse(self, value) if _is_view(self) else base_attn.fset(self, value)

        def get_internal(self):
            if _is_view(self):
                return ATTN_IMPLEMENTATION
            try:
                return self.__dict__["_attn_implementation_internal"]
            except KeyError:
                raise AttributeError("_attn_implementation_internal") from None

        def set_internal(self, value):
            if _is_view(self):
                _refuse(self, value)
            self.__dict__["_attn_implementation_internal"] = value

        _VIEW_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__slots__": ("_rlhf_ops_view",),
            "_attn_implementation": property(get_attn, set_attn),
            "_attn_implementation_internal": property(get_internal, set_internal),
            "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} seen through rlhf_ops: attention is {ATTN_IMPLEMENTATION!r}.",
        })
    return _VIEW_CLASSES[cls]


def _config_view(config):
    view = object.__new__(_view_class(type(config)))
    object.__setattr__(view, "__dict__", config.__dict__)     # one attribute dict: writes are shared
    object.__setattr__(view, "_rlhf_ops_view", True)
    return view


# ------------------------------------------------------------------------------- masks ---

def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask: Tensor | None = None, **kwargs):
    """Mask function registered for ATTN_IMPLEMENTATION: the 2-D padding mask [B, ≤ kv_length]
    (bool, True = real token) of this call's keys, or None without an attention_mask.
    Causality and windows are the kernel's. Nothing is read on the host: an all-ones mask is
    returned as it is (the padded route handles it exactly).

    A static cache is longer than the tokens it holds: when no attention_mask is given (generate
    drops an all-ones mask), the keys past the q_offset + q_length written so far are masked
    (q_offset is a tensor there: one host read, in generation only)."""
    if attention_mask is None:
        n_valid = int(q_offset) + q_length
        if n_valid >= kv_length:
            return None
        return torch.ones(batch_size, n_valid, dtype=torch.bool, device=kwargs.get("device"))
    return attention_mask[:, -kv_length:]


def _real_first(mask: Tensor):
    """mask [B, L] bool → (src, dst) [B, L] int64: slot j of row b holds token src[b, j] — the
    row's real tokens first, in order, then its padding tokens — and token t sits in slot dst[b, t]."""
    real = mask.long().cumsum(1)                                    # real tokens up to t
    pads = (~mask).long().cumsum(1)
    dst = torch.where(mask, real - 1, mask.sum(1, keepdim=True) + pads - 1)
    src = torch.empty_like(dst).scatter_(1, dst, torch.arange(mask.shape[1], device=mask.device)
                                         .expand_as(dst))
    return src, dst


def _padded_meta(mask: Tensor, T: int):
    """Padding mask [B, S] of the keys, whose last T columns are the queries' → the layout of the
    padded route: (src_q, dst_q [B, T], src_k [B, S], cu_q, cu_k int32 [3B + 1]). Row b holds
    three segments: (its real queries, its real keys), (its padding queries, no key: they output
    0), (no query, its padding keys). Static shapes, no host read."""
    mask = mask.bool()
    B, S = mask.shape
    mq = mask[:, S - T:]
    src_q, dst_q = _real_first(mq)
    src_k, _ = _real_first(mask)
    nq, nk = mq.sum(1), mask.sum(1)
    zero = torch.zeros(1, dtype=torch.long, device=mask.device)
    base_q = torch.arange(B, device=mask.device) * T
    base_k = torch.arange(B, device=mask.device) * S
    cu_q = torch.cat([torch.stack([base_q, base_q + nq, base_q + T], 1).reshape(-1), zero + B * T])
    cu_k = torch.cat([torch.stack([base_k, base_k + nk, base_k + nk], 1).reshape(-1), zero + B * S])
    return src_q, dst_q, src_k, cu_q.to(torch.int32), cu_k.to(torch.int32)


def _restarts(position_ids: Tensor, batch: int, seqlen: int) -> Tensor:
    """[B, T] bool: True where a new sequence starts inside a row (transformers' eager rule: the
    position does not grow by exactly 1); column 0 is False."""
    pos = position_ids.expand(batch, seqlen)
    return F.pad(pos[:, 1:] != pos[:, :-1] + 1, (1, 0), value=False)


def _packed_meta(position_ids: Tensor, batch: int, seqlen: int):
    """position_ids [B or 1, T] → (cu_seqlens int32, max_seqlen) over the flat B·T tokens, or None
    when no row holds more than one sequence. Sequences start at each row start and at each
    restart. One host read (the start flags)."""
    start = _restarts(position_ids, batch, seqlen)
    start[:, 0] = True
    flags = start.reshape(-1).cpu()
    if int(flags.sum()) == batch:
        return None
    bounds = torch.cat([flags.nonzero().squeeze(1), torch.tensor([batch * seqlen])])
    return bounds.to(device=position_ids.device, dtype=torch.int32), int(bounds.diff().max())


# --------------------------------------------------------------------------- attention ---

def _check_created_family(module) -> None:
    """A model created with attn_implementation="rlhf_ops" skips apply_rlhf_ops' family check:
    check its attention modules' family here."""
    mt = getattr(getattr(module, "config", None), "model_type", None)
    if mt is not None and mt not in SUPPORTED_FAMILIES:
        raise ValueError(_err(f"{type(module).__name__}: model_type {mt!r} was created with "
                              f"attn_implementation={ATTN_IMPLEMENTATION!r}, but its attention has not "
                              f"been validated against rlhf_ops. Supported families: "
                              f"{', '.join(SUPPORTED_FAMILIES)}"))


def _warn_if_forward_replaced(state: _State) -> None:
    """Once per model: the fused loss was installed, but something replaced the forward since
    (TRL's trainers install their own fused LM head): say whose loss runs now."""
    if state.warned_forward or state.forward is None:
        return
    model = state.model()
    fwd = None if model is None else model.__dict__.get("forward")
    if fwd is None or getattr(fwd, "_rlhf_ops_state", None) is state \
            or getattr(fwd, "_rlhf_ops_fused_lm_head", False):
        return
    state.warned_forward = True
    logger.warning(_err(
        f"the forward of this {type(model).__name__} was replaced after apply_rlhf_ops (TRL's trainers "
        f"install their own fused LM head): attention runs on rlhf_ops, but the loss / log-probs now "
        f"come from that forward, not from rlhf_ops. In a TRL trainer, use "
        f"rlhf_ops.integrations.trl.FusedLMHeadMixin to run rlhf_ops' LM head"))


def _attention_forward(module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, sliding_window: int | None = None,
                       softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, S, D] →
    (out [B, T, Hq, D], None)."""
    name = type(module).__name__
    if dropout:
        raise ValueError(_err(f"{name}: attention dropout p={dropout} in training mode is not "
                              f"supported by rlhf_ops attention; set the config's attention dropout "
                              f"(attention_dropout / attn_pdrop) to 0.0, or call model.eval()"))
    if kwargs.get("output_attentions"):
        raise ValueError(_err(f"{name}: output_attentions=True needs the attention probabilities, "
                              f"which rlhf_ops never materialises; remove_rlhf_ops(model) first"))
    if kwargs.get("s_aux") is not None:
        raise ValueError(_err(f"{name}: attention sinks (s_aux) are not supported"))
    state = _state_of(module)
    if state is None:
        _check_created_family(module)
        backend, memo = None, _CREATED_MEMO
    else:
        _warn_if_forward_replaced(state)
        backend, memo = state.backend, state.memo
    causal = bool(module.is_causal if is_causal is None else is_causal)
    if sliding_window is None:    # Qwen2-MoE sets it on the layer without passing it (its eager
        sliding_window = getattr(module, "sliding_window", None)     # mask has the window)
    window = (-1, -1)
    if sliding_window is not None:
        # transformers' window W: a query sees itself and the W − 1 keys before it.
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    opts = dict(softmax_scale=scaling, causal=causal, window_size=window,
                softcap=0.0 if softcap is None else float(softcap), backend=backend)

    B, Hq, T, D = query.shape
    S = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)   # [B, L, H, D]
    dt = _autocast_dtype(q.device)
    if dt is not None:     # under autocast, attention runs in its dtype (as SDPA and flash-attn do)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)

    if kwargs.get("rlhf_ops_tree") is not None:     # a shared-prefix batch (integrations.tree)
        from .tree import tree_attention
        return tree_attention(q, k, v, kwargs["rlhf_ops_tree"], module_name=name, **opts), None

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(_err(f"{name}: got a {attention_mask.dim()}-D attention mask of shape "
                                  f"{tuple(attention_mask.shape)}; rlhf_ops attention takes 2-D "
                                  f"padding masks [B, S] (from attention_mask), packed position_ids "
                                  f"or cu_seq_lens — not a custom 4-D mask"))
        M = attention_mask.shape[1]
        if S > M:          # a static cache is longer than the tokens seen so far
            k, v, S = k[:, :M], v[:, :M], M
        src_q, dst_q, src_k, cu_q, cu_k = memo(attention_mask, ("padded", T),
                                               lambda: _padded_meta(attention_mask, T))
        rows = torch.arange(B, device=q.device)[:, None]
        out = flash_attn_varlen_func(q[rows, src_q].reshape(B * T, Hq, D),
                                     k[rows, src_k].reshape(B * S, -1, D),
                                     v[rows, src_k].reshape(B * S, -1, D), cu_q, cu_k, T, S, **opts)
        return out.view(B, T, Hq, D)[rows, dst_q], None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        out = flash_attn_varlen_func(q.reshape(B * T, Hq, D), k.reshape(B * S, -1, D),
                                     v.reshape(B * S, -1, D), cu_q.to(torch.int32),
                                     cu_k.to(torch.int32), max_q, max_k, **opts)
        return out.view(B, T, Hq, D), None

    position_ids = kwargs.get("position_ids")
    if position_ids is not None and T == S and T > 1 and position_ids.shape[-1] == T:
        if torch.compiler.is_compiling():
            # the boundaries cannot be read here: refuse a packed batch on the device, no sync
            torch._assert_async(~_restarts(position_ids, B, T).any(), _err(
                "under torch.compile, a packed batch needs cu_seq_lens_q/k and max_length_q/k "
                "(TRL's padding-free collator, DataCollatorWithFlattening(return_flash_attn_kwargs"
                "=True)); position_ids that restart inside a row cannot be read without a host sync"))
        else:
            packed = memo(position_ids, ("packed", B), lambda: _packed_meta(position_ids, B, T))
            if packed is not None:
                cu, max_len = packed
                out = flash_attn_varlen_func(q.reshape(B * T, Hq, D), k.reshape(B * S, -1, D),
                                             v.reshape(B * S, -1, D), cu, cu, max_len, max_len,
                                             **opts)
                return out.view(B, T, Hq, D), None

    return flash_attn_func(q, k, v, **opts), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)


# -------------------------------------------------------------------------------- loss ---

def _autocast_dtype(device: torch.device):
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _make_lm_forward(model: PreTrainedModel, state: _State, output_cls):
    cls_forward = type(model).forward
    params = list(inspect.signature(cls_forward).parameters.values())[1:]          # without self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    moe = output_cls is MoeCausalLMOutputWithPast
    prev = model.forward            # the bound forward we wrap (the class's, or an instance's)

    @functools.wraps(cls_forward)   # keep the signature: generate() and the Trainer inspect it
    def forward(self, *args, skip_logits: bool | None = None, **kwargs):
        if len(args) > len(names):
            raise TypeError(_err(f"{type(self).__name__}.forward takes {len(names)} positional "
                                 f"arguments, got {len(args)}"))
        a = dict(zip(names, args))
        for k in kwargs.keys() & a.keys():
            raise TypeError(_err(f"{type(self).__name__}.forward got {k!r} twice"))
        a.update(kwargs)
        labels = a.pop("labels", None)
        if skip_logits is None:       # Liger's rule: fuse in training, when there is a loss to take
            skip_logits = self.training and labels is not None
        if not skip_logits:           # eval, inference, generate: the model's own forward, logits
            return prev(*args, **kwargs)
        if labels is None:
            raise ValueError(_err("skip_logits=True needs labels: the fused loss is all it returns"))
        shift_labels = a.pop("shift_labels", None)
        logits_to_keep = a.pop("logits_to_keep", 0)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError(_err("logits_to_keep cannot be combined with the fused loss (no logits "
                                  "are formed); drop logits_to_keep, or pass skip_logits=False"))
        num_items = a.pop("num_items_in_batch", None)
        ignore_index = a.pop("ignore_index", -100)
        return_dict = a.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if moe:
            if a.get("output_router_logits") is None:
                a["output_router_logits"] = self.config.output_router_logits

        outputs = getattr(self, self.base_model_prefix)(**a)
        hidden = outputs.last_hidden_state
        if shift_labels is None:      # position t predicts token t + 1
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        dt = _autocast_dtype(hidden.device)
        if dt is not None:            # what the nn.Linear head would have computed in under autocast
            hidden, weight = hidden.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        scale, softcap = logit_transform(self.config)     # read at each call, as the model does
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if scale != 1.0:              # scale·(h Wᵀ + b) = (scale·h) Wᵀ + scale·b
            hidden = hidden * scale
            bias = None if bias is None else bias * scale
        target = shift_labels.reshape(-1).to(hidden.device)
        if target.shape[0] != hidden.shape[0]:
            raise ValueError(_err(f"labels/shift_labels hold {target.shape[0]} tokens but the model "
                                  f"saw {hidden.shape[0]}; they must have the input_ids' shape"))
        _backend.require("linear_cross_entropy", state.backend, hidden.device, exact=True,
                         where=_err("the fused loss"), dtype=hidden.dtype)
        # logits = c·tanh(scale·(h Wᵀ + b)/c): the scale is in hidden/bias, the cap is the op's
        loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                    reduction="mean" if num_items is None else "sum",
                                    softcap=0.0 if softcap is None else float(softcap),
                                    backend=state.backend)
        if num_items is not None:
            if isinstance(num_items, Tensor):
                num_items = num_items.to(loss.device)
            loss = loss / num_items
        fields = dict(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                      hidden_states=getattr(outputs, "hidden_states", None),
                      attentions=getattr(outputs, "attentions", None))
        if output_cls is CausalLMOutputWithCrossAttentions:
            fields["cross_attentions"] = getattr(outputs, "cross_attentions", None)
        if moe:                       # the router load-balancing loss, as the model adds it
            fields["router_logits"] = outputs.router_logits
            if a["output_router_logits"]:
                balance = sys.modules[type(self).__module__].load_balancing_loss_func
                aux = balance(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                              a.get("attention_mask"))
                fields["aux_loss"] = aux
                fields["loss"] = loss + self.router_aux_loss_coef * aux.to(loss.device)
        out = output_cls(**fields)
        return out if return_dict else out.to_tuple()

    forward._rlhf_ops_state = state
    return forward


# ---------------------------------------------------------------------------- public API ---

def _family(model) -> str:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(_err(f"apply_rlhf_ops expects a transformers PreTrainedModel, got "
                             f"{type(model).__name__}"))
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED_FAMILIES:
        missing = ("it does not route attention through transformers' AttentionInterface "
                   "(_supports_attention_backend is False)"
                   if not getattr(model, "_supports_attention_backend", False) else
                   "its attention and LM head have not been validated against rlhf_ops")
        raise ValueError(_err(f"{type(model).__name__} (model_type {mt!r}) is not supported: "
                              f"{missing}. Supported families: {', '.join(SUPPORTED_FAMILIES)}"))
    if getattr(model.config, "sub_configs", None):
        raise ValueError(_err(f"{type(model).__name__} has sub-configs "
                              f"({', '.join(model.config.sub_configs)}): composite models are not "
                              f"supported"))
    if mt == "gpt2" and getattr(model.config, "add_cross_attention", False):
        raise ValueError(_err("GPT-2 with add_cross_attention=True is not supported: the rlhf_ops "
                              "route handles causal self-attention with padding masks only"))
    return mt


def apply_rlhf_ops(model: PreTrainedModel, *, attention: bool = True, loss: bool = True,
                   backend: str | None = None) -> PreTrainedModel:
    """Route this model instance's attention (and its causal-LM loss) through rlhf_ops, in place.

    ``attention``: every attention layer runs ``rlhf_ops.attention[_varlen]`` (padding, packing,
    sliding windows, softcap, KV cache as flash-attn). ``loss``: in training mode with ``labels``
    the causal-LM loss is ``rlhf_ops.linear_cross_entropy`` on the final hidden states and
    ``logits`` in the output is None (causal-LM heads only; eval mode returns logits).
    ``backend``: the rlhf_ops backend of every op (None: the ``use_backend`` /
    ``RLHF_OPS_BACKEND`` / auto choice at call time). Nothing global changes; a model patched
    before is re-patched with the new options. Returns ``model``. See the module docstring for
    what is supported and what raises.
    """
    family = _family(model)
    if backend is not None:
        _backend.check_name(backend)                      # validates the name, names the choices
    lm_name, output_cls = SUPPORTED_FAMILIES[family]
    fuse_loss = bool(loss) and isinstance(model, getattr(transformers, lm_name))
    if _state_of(model) is not None:
        remove_rlhf_ops(model)

    state = _State(backend=backend, attention=bool(attention), loss=fuse_loss, family=family,
                   model=weakref.ref(model))
    if attention:
        views = {}
        for module in model.modules():
            cfg = module.__dict__.get("config")
            if cfg is not None and isinstance(cfg, transformers.PreTrainedConfig):
                view = views.setdefault(id(cfg), _config_view(cfg))
                state.rebound.append((module, cfg))
                module.config = view
                module._rlhf_ops = state
    if fuse_loss:
        state.had_prev_forward = "forward" in model.__dict__
        state.prev_forward = model.__dict__.get("forward")
        state.forward = _make_lm_forward(model, state, output_cls).__get__(model)
        model.forward = state.forward
    model._rlhf_ops = state
    return model


def remove_rlhf_ops(model: PreTrainedModel) -> PreTrainedModel:
    """Undo ``apply_rlhf_ops``: the original config objects and forward. Returns ``model``."""
    state = model.__dict__.get("_rlhf_ops")
    if state is None:
        raise ValueError(_err(f"{type(model).__name__} is not patched by apply_rlhf_ops"))
    if state.forward is not None:
        current = model.__dict__.get("forward")
        if getattr(current, "_rlhf_ops_state", None) is not state:
            raise RuntimeError(_err("the model's forward was wrapped again after apply_rlhf_ops "
                                    "(e.g. by a trainer); undo that wrapper first"))
        if state.had_prev_forward:
            model.forward = state.prev_forward
        else:
            del model.forward
    for module, cfg in state.rebound:
        module.config = cfg
        module.__dict__.pop("_rlhf_ops", None)
    model.__dict__.pop("_rlhf_ops", None)
    return model


def rlhf_ops_status(model) -> dict | None:
    """What ``apply_rlhf_ops`` patched on ``model`` (None if nothing): family, attention, loss,
    backend."""
    state = _state_of(model)
    if state is None:
        return None
    return {"family": state.family, "attention": state.attention, "loss": state.loss,
            "backend": state.backend}


class AutoRlhfOpsModelForCausalLM:
    """``AutoModelForCausalLM`` that returns the model patched by ``apply_rlhf_ops``:

        model = AutoRlhfOpsModelForCausalLM.from_pretrained(path, torch_dtype=..., backend="triton")
        model = AutoRlhfOpsModelForCausalLM.from_config(config)      # random init, no download

    ``attention``, ``loss``, ``backend`` are ``apply_rlhf_ops``' options; every other argument is
    ``AutoModelForCausalLM``'s. The family is checked before any weight is loaded."""

    def __init__(self, *args, **kwargs):
        raise TypeError(_err("AutoRlhfOpsModelForCausalLM is built with .from_pretrained(...) or "
                             ".from_config(...), as AutoModelForCausalLM"))

    @staticmethod
    def _check_config(config) -> None:
        mt = getattr(config, "model_type", None)
        if mt not in SUPPORTED_FAMILIES:
            raise ValueError(_err(f"model_type {mt!r} is not supported. Supported families: "
                                  f"{', '.join(SUPPORTED_FAMILIES)}"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, attention: bool = True,
                        loss: bool = True, backend: str | None = None, **kwargs) -> PreTrainedModel:
        config = kwargs.get("config")
        if not isinstance(config, transformers.PreTrainedConfig):
            config = transformers.AutoConfig.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False))
        cls._check_config(config)
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return apply_rlhf_ops(model, attention=attention, loss=loss, backend=backend)

    @classmethod
    def from_config(cls, config, *, attention: bool = True, loss: bool = True,
                    backend: str | None = None, **kwargs) -> PreTrainedModel:
        cls._check_config(config)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        return apply_rlhf_ops(model, attention=attention, loss=loss, backend=backend)
