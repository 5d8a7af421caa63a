"""One line to run a Hugging Face transformers model on rlhf_ops: attention and the LM loss.

    from rlhf_ops.integrations.transformers import apply_rlhf_ops, remove_rlhf_ops
    model = apply_rlhf_ops(model)                 # in place, this instance only; returns model
    loss = model(input_ids, attention_mask=mask, labels=labels).loss     # .logits is None
    remove_rlhf_ops(model)                        # back to the original, bit for bit

What changes (tested families: Llama, Mistral, Qwen2, Qwen3, Gemma-2, GPT-2; any head class of
them — causal LM, sequence classification (reward models), the bare model):

* **attention** (``attention=True``): every attention layer runs ``rlhf_ops.attention`` /
  ``attention_varlen`` through the flash-attn-style wrappers of ``rlhf_ops.integrations.flash``,
  the route transformers takes for FlashAttention-2: a padded batch (left, right or mixed padding,
  from ``attention_mask``) is unpadded to packed sequences; a packed batch — ``position_ids`` that
  restart inside a row, as ``DataCollatorWithFlattening`` makes them, or explicit
  ``cu_seq_lens_q/k`` + ``max_length_q/k`` — runs as one varlen call, each sequence seeing only
  itself; a batch without padding runs the dense kernel. Sliding windows (Mistral, Gemma-2,
  Qwen2/3 ``layer_types``), Gemma-2's score softcap, GQA and the KV cache of ``generate`` (dynamic
  or static) are handled as flash-attn does them. The attention probabilities are never
  materialised; under autocast attention runs in the autocast dtype. Packing follows
  transformers' eager rule — a new sequence starts wherever the position does not grow by exactly
  1 — whenever no ``attention_mask`` is given (eager applies it only without a cache object, so
  pass ``use_cache=False`` to an eager baseline). Padding query rows output zeros (flash-attn's
  convention; eager fills them with something meaningless): a label scored from a padding position
  — the first real token after left padding — differs from eager; mask it, as prompts are.
* **loss** (``loss=True``, causal-LM heads only): when the forward gets ``labels``, the loss is
  ``rlhf_ops.linear_cross_entropy`` of the final hidden states and the LM-head weight (tied or
  not) — the [tokens, vocab] logits are never formed — with transformers' semantics: labels
  shifted by one (``shift_labels``, when given with them, are used as they are), ``ignore_index``
  (default −100), ``num_items_in_batch`` (the loss is the sum divided by it, as the Trainer's
  gradient accumulation expects), else the mean over non-ignored tokens — except that a batch
  without any non-ignored token gives 0 (not NaN). **The output's ``logits`` is None then** (as
  with Liger-Kernel); without labels the forward is the original one, so inference and
  ``generate`` are unchanged. Other heads (sequence classification, the bare model) keep their
  own loss: ``loss=True`` does nothing for them (``rlhf_ops_status(model)`` says what is patched).

How, and what stays untouched. The model's config objects are replaced, on this model's modules
only, by *views*: objects of a subclass of the config class that share the original's attribute
dict (so reads and writes go to the original) but report ``_attn_implementation ==
"rlhf_ops"``. Two models built from one config object therefore stay independent. The LM
loss is an instance-level ``forward``. The only process-wide effect is that the name
"rlhf_ops" is registered in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
(the mask function returns the 2-D padding mask, as for FlashAttention-2); no existing entry,
class or function is modified. A model *created* with ``attn_implementation="rlhf_ops"`` (TRL
does so for a reference model copied from a patched policy) runs its attention through rlhf_ops
on the default backend, without the fused loss. ``remove_rlhf_ops`` restores
the original config objects and forward. ``copy.deepcopy`` of a patched model gives a patched
copy; pickling a patched model object is not supported (``save_pretrained`` is).

Errors instead of silent fallbacks: a model family that is not supported; Gemma-2's
``final_logit_softcapping`` with ``loss=True`` (the fused loss has no logit softcap); attention
dropout > 0 in training mode; ``output_attentions=True``; a 4-D (custom) attention mask; attention
sinks; ``logits_to_keep`` together with ``labels``; bf16 on the Triton backend under the CPU
interpreter.

Host syncs: unpadding and packing read the sequence lengths on the host once per forward (per
distinct mask; the result is reused by every layer), as transformers' FlashAttention-2 path does.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor
from transformers import PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast
from transformers.modeling_utils import AttentionInterface

from .. import _backend
from ..cross_entropy import linear_cross_entropy
from ..padding import pad
from .flash import flash_attn_func, flash_attn_varlen_func

__all__ = ["apply_rlhf_ops", "remove_rlhf_ops", "rlhf_ops_status", "ATTN_IMPLEMENTATION",
           "SUPPORTED_FAMILIES"]

# No "flash" in the name: transformers would try to load a flash-attn kernel for a model created
# with it (TRL builds reference models with the policy's attn_implementation).
ATTN_IMPLEMENTATION = "rlhf_ops"

# model_type → the causal-LM class whose forward the fused loss replaces (and its output type).
SUPPORTED_FAMILIES = {
    "llama": ("LlamaForCausalLM", CausalLMOutputWithPast),
    "mistral": ("MistralForCausalLM", CausalLMOutputWithPast),
    "qwen2": ("Qwen2ForCausalLM", CausalLMOutputWithPast),
    "qwen3": ("Qwen3ForCausalLM", CausalLMOutputWithPast),
    "gemma2": ("Gemma2ForCausalLM", CausalLMOutputWithPast),
    "gpt2": ("GPT2LMHeadModel", CausalLMOutputWithCrossAttentions),
}


def _err(msg: str) -> str:
    return f"rlhf_ops.integrations.transformers: {msg}"


# ------------------------------------------------------------------------------ per-model state ---

@dataclass(eq=False)
class _State:
    backend: str | None
    attention: bool
    loss: bool
    family: str
    rebound: list = field(default_factory=list)        # (module, original config)
    forward: object = None                             # our instance forward, when loss is patched
    prev_forward: object = None                        # the instance forward we replaced, if any
    had_prev_forward: bool = False
    _cache: list = field(default_factory=list)         # [(tensor, version, key, value)], newest last

    def cached(self, t: Tensor, key, compute):
        """``compute()`` once per (tensor object, in-place version, key): every layer of one
        forward passes the same mask / position_ids object, so the host sync happens once."""
        ver = t._version
        for ref, v, k, val in self._cache:
            if ref is t and v == ver and k == key:
                return val
        val = compute()
        self._cache.append((t, ver, key, val))
        del self._cache[:-4]
        return val


def _state_of(module) -> _State | None:
    return getattr(module, "_rlhf_ops", None)


# --------------------------------------------------------------------------- config views ---

_VIEW_CLASSES: dict[type, type] = {}


def _view_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``_attn_implementation`` is ours (read-only)."""
    if cls not in _VIEW_CLASSES:
        def _get(self):
            return ATTN_IMPLEMENTATION

        def _set(self, value):
            raise RuntimeError(_err(f"this model is patched by apply_rlhf_ops (attention "
                                    f"{ATTN_IMPLEMENTATION!r}); call remove_rlhf_ops(model) before "
                                    f"setting its attention implementation to {value!r}"))

        _VIEW_CLASSES[cls] = type(cls.__name__, (cls,), {
            "_attn_implementation": property(_get, _set),
            "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} seen through rlhf_ops: attention is {ATTN_IMPLEMENTATION!r}.",
        })
    return _VIEW_CLASSES[cls]


def _config_view(config):
    view = object.__new__(_view_class(type(config)))
    object.__setattr__(view, "__dict__", config.__dict__)     # one attribute dict: writes are shared
    return view


# ------------------------------------------------------------------------------- masks ---

def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask: Tensor | None = None, **kwargs):
    """Mask function registered for ATTN_IMPLEMENTATION: the 2-D padding mask [B, ≤ kv_length]
    (bool, True = real token) of this call's keys, or None when every key is real — the contract
    of transformers' FlashAttention-2 mask. Causality and windows are the kernel's.

    A static cache is longer than the tokens it holds: when no attention_mask is given (generate
    drops an all-ones mask), the keys past the q_offset + q_length written so far are masked
    (q_offset is a tensor there: one host sync)."""
    if attention_mask is None:
        n_valid = int(q_offset) + q_length
        if n_valid >= kv_length:
            return None
        return torch.ones(batch_size, n_valid, dtype=torch.bool, device=kwargs.get("device"))
    mask = attention_mask[:, -kv_length:]
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def _unpad_meta(mask: Tensor):
    """mask [B, L] (nonzero = real) → (indices [N] int64 into the flat B·L tokens, cu_seqlens
    int32 [B + 1], max_seqlen int). Reads the lengths on the host (one sync)."""
    mask = mask.bool()
    lens = mask.sum(-1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    indices = mask.reshape(-1).nonzero().squeeze(1)
    return indices, cu, int(lens.max()) if lens.numel() else 0


def _packed_meta(position_ids: Tensor, batch: int, seqlen: int):
    """position_ids [B or 1, T] → (cu_seqlens int32, max_seqlen) over the flat B·T tokens, or None
    when no row holds more than one sequence. transformers' eager rule: a sequence starts at each
    row start and wherever the position does not grow by exactly 1."""
    pos = position_ids.expand(batch, seqlen)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(start[:, 1:].any()):
        return None
    starts = start.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([batch * seqlen])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# --------------------------------------------------------------------------- attention ---

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
    backend = state.backend if state is not None else None
    causal = bool(module.is_causal if is_causal is None else is_causal)
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
    memo = state.cached if state is not None else (lambda t, key_, f: f())

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(_err(f"{name}: got a {attention_mask.dim()}-D attention mask of shape "
                                  f"{tuple(attention_mask.shape)}; rlhf_ops attention takes 2-D "
                                  f"padding masks [B, S] (from attention_mask), packed position_ids "
                                  f"or cu_seq_lens — not a custom 4-D mask"))
        M = attention_mask.shape[1]
        if S > M:          # a static cache is longer than the tokens seen so far
            k, v, S = k[:, :M], v[:, :M], M
        idx_k, cu_k, max_k = memo(attention_mask, "k", lambda: _unpad_meta(attention_mask))
        if T == S:
            idx_q, cu_q, max_q = idx_k, cu_k, max_k
        else:              # decoding / chunked prefill: the queries are the last T positions
            idx_q, cu_q, max_q = memo(attention_mask, ("q", T),
                                      lambda: _unpad_meta(attention_mask[:, -T:]))
        out = flash_attn_varlen_func(q.reshape(B * T, Hq, D)[idx_q], k.reshape(B * S, -1, D)[idx_k],
                                     v.reshape(B * S, -1, D)[idx_k], cu_q, cu_k, max_q, max_k, **opts)
        return pad(out, idx_q, B, T), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        out = flash_attn_varlen_func(q.reshape(B * T, Hq, D), k.reshape(B * S, -1, D),
                                     v.reshape(B * S, -1, D), cu_q.to(torch.int32),
                                     cu_k.to(torch.int32), max_q, max_k, **opts)
        return out.view(B, T, Hq, D), None

    position_ids = kwargs.get("position_ids")
    if position_ids is not None and T == S and T > 1 and position_ids.shape[-1] == T:
        packed = memo(position_ids, ("packed", B), lambda: _packed_meta(position_ids, B, T))
        if packed is not None:
            cu, max_len = packed
            out = flash_attn_varlen_func(q.reshape(B * T, Hq, D), k.reshape(B * S, -1, D),
                                         v.reshape(B * S, -1, D), cu, cu, max_len, max_len, **opts)
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
    sig = inspect.signature(cls_forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    prev = model.forward            # the bound forward we wrap (the class's, or an instance's)

    @functools.wraps(cls_forward)   # keep the signature: generate() and the Trainer inspect it
    def forward(self, *args, **kwargs):
        if kwargs.get("labels") is None and len(args) < 2:
            return prev(*args, **kwargs)                    # the common no-label call, unchanged
        bound = sig.bind(self, *args, **kwargs)
        a = dict(bound.arguments)
        a.pop(next(iter(sig.parameters)))                  # self
        extra = dict(a.pop(var_kw, {})) if var_kw else {}
        labels = a.pop("labels", None)
        if labels is None:            # as transformers: no labels, no loss (shift_labels alone too)
            return prev(*args, **kwargs)
        shift_labels = extra.pop("shift_labels", None)
        logits_to_keep = a.pop("logits_to_keep", 0)
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError(_err("logits_to_keep cannot be combined with labels when the loss is "
                                  "fused (no logits are formed); drop logits_to_keep or labels"))
        num_items = extra.pop("num_items_in_batch", None)
        ignore_index = extra.pop("ignore_index", -100)
        return_dict = extra.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        outputs = getattr(self, self.base_model_prefix)(**a, **extra)
        hidden = outputs.last_hidden_state
        if shift_labels is None:      # position t predicts token t + 1
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        dt = _autocast_dtype(hidden.device)
        if dt is not None:            # what the nn.Linear head would have computed in under autocast
            hidden, weight = hidden.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        target = shift_labels.reshape(-1).to(hidden.device)
        if target.shape[0] != hidden.shape[0]:
            raise ValueError(_err(f"labels/shift_labels hold {target.shape[0]} tokens but the model "
                                  f"saw {hidden.shape[0]}; they must have the input_ids' shape"))
        if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16 \
                and _backend.resolve("linear_cross_entropy", state.backend, hidden.device) == "triton":
            raise TypeError(_err("bfloat16 on the Triton backend under the CPU interpreter is not "
                                 "supported (the interpreter computes tl.dot on bf16 wrongly); use "
                                 "float32 on the CPU or backend='reference'"))
        loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                    reduction="mean" if num_items is None else "sum",
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
    sliding windows, softcap, KV cache as flash-attn). ``loss``: with ``labels`` the causal-LM loss
    is ``rlhf_ops.linear_cross_entropy`` on the final hidden states and ``logits`` in the output is
    None (causal-LM heads only). ``backend``: the rlhf_ops backend of every op (None: the
    ``use_backend`` / ``RLHF_OPS_BACKEND`` / auto choice at call time). Nothing global changes; a
    model patched before is re-patched with the new options. Returns ``model``. See the module
    docstring for what is supported and what raises.
    """
    family = _family(model)
    if backend is not None:
        _backend.requested(backend)                       # validates the name, names the choices
    lm_name, output_cls = SUPPORTED_FAMILIES[family]
    lm_cls = getattr(transformers, lm_name)
    fuse_loss = bool(loss) and isinstance(model, lm_cls)
    if fuse_loss and getattr(model.config, "final_logit_softcapping", None) is not None:
        raise ValueError(_err(f"{type(model).__name__} applies final_logit_softcapping="
                              f"{model.config.final_logit_softcapping} to its logits, which the fused "
                              f"loss (linear_cross_entropy) does not do; pass loss=False (attention "
                              f"only) or set config.final_logit_softcapping=None"))
    if _state_of(model) is not None:
        remove_rlhf_ops(model)

    state = _State(backend=backend, attention=bool(attention), loss=fuse_loss, family=family)
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
