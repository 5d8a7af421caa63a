"""Bytes an op keeps for backward: the one count that bench/memory.py, the tests and the
training report use.

``packed_for_backward()`` records every tensor autograd packs for backward while its block runs
(``saved_tensors_hooks``; works on meta tensors, where no data exists). ``saved_for_backward``
counts, on top of that, tensors an op keeps alive elsewhere (found with ``gc``: a gradient
precomputed in the forward and stored on the autograd context) and leaves out the op's inputs;
storages are counted once each, at their full size.
"""
from __future__ import annotations

import contextlib
import gc

import torch


@contextlib.contextmanager
def packed_for_backward():
    """``with packed_for_backward() as packed: ...``: ``packed`` lists every tensor autograd packs
    for backward inside the block (one entry per pack, the same tensor possibly several times)."""
    packed: list = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield packed


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def saved_for_backward(call, make_inputs) -> dict:
    """Run ``call(inputs)`` with ``inputs = make_inputs()`` (meta tensors, or any) and count what
    it keeps for backward, in bytes: ``saved_bytes`` (saved storages and tensors kept alive
    elsewhere, the inputs' storages excluded) = ``saved_tensor_bytes`` + ``kept_elsewhere_bytes``;
    ``saved_bytes_incl_inputs``; ``n_saved_storages``."""
    inputs = make_inputs()

    # After a full collection every surviving object sits in the oldest generation. With the
    # automatic collector off, every object the forward creates is in generation 0; collecting
    # generation 0 afterwards frees the dead ones (cycles included) and moves the survivors to
    # generation 1, so generation 1 then holds exactly the objects the op created and kept alive.
    gc.collect()
    gc.disable()
    try:
        with packed_for_backward() as packed:
            out = call(inputs)
        outs = _flat(out)
        gc.collect(0)
        created = [o for o in gc.get_objects(generation=1) if issubclass(type(o), torch.Tensor)]
    finally:
        gc.enable()
    if not any(t.requires_grad for t in outs):
        raise RuntimeError("the op's output does not require grad: nothing would be saved")
    input_keys = {_key(t) for t in inputs}
    saved = {}
    for t in packed:
        saved[_key(t)] = t.untyped_storage().nbytes()
    skip = input_keys | set(saved) | {_key(t) for t in outs}
    elsewhere = {}
    for t in created:
        if t.device.type == "meta" and _key(t) not in skip:
            elsewhere[_key(t)] = t.untyped_storage().nbytes()
    new_saved = sum(v for k, v in saved.items() if k not in input_keys)
    return {"saved_bytes": new_saved + sum(elsewhere.values()),
            "saved_tensor_bytes": new_saved,
            "kept_elsewhere_bytes": sum(elsewhere.values()),
            "saved_bytes_incl_inputs": sum(saved.values()) + sum(elsewhere.values()),
            "n_saved_storages": len(saved)}
