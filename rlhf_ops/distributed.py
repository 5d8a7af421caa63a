"""Vocabulary parallelism: the one place where per-row softmax statistics of vocabulary shards
are combined across the ranks of a ``torch.distributed`` process group.

Setting (tensor parallelism over the LM head, as Megatron's ``vocab_parallel_cross_entropy`` or
PyTorch's ``loss_parallel()``): rank r of the group holds the contiguous slice [o_r, o_r + V_r)
of a V-wide vocabulary, in rank order (slices may differ in size, even be empty); targets hold
global ids and are the same on every rank, as is everything upstream of the logits. Each op

  0. takes its inputs apart (``VocabCall``: a DTensor's local shard and the mesh's group) and
     runs its own input checks so that a rejection on one rank stops every rank
     (``rejects_together``);
  1. locates this rank's slice (``shard_offset``: one all_gather of a few int64 per rank, which
     also lets every rank check, together, that all ranks passed the same shapes, settings and
     targets — an error on every rank, never a hang — and that no target lies outside [0, V));
  2. computes per-row statistics of its slice with the fused kernels (or eagerly, reference);
  3. all-gathers them (``gather_stats``: k numbers per row and rank, never a V-sized tensor) and
     combines them (``combine_slices``), identically on every rank, into the full-vocabulary
     result;
  4. runs its fused backward against the combined (global) statistics: the gradient of each
     rank's slice needs no communication; the linear ops all-reduce d hidden (``all_reduce_``,
     the input gradient of a column-parallel layer); results of DTensor inputs come back as
     replicated DTensors.
``VocabCall`` runs this sequence; an op module supplies only its checks, the statistics of a
slice (its fused kernel inside a custom op, or the eager ``*_stats_reference`` of
``_vocab_stats``) and which ``*_combine`` there turns the gathered statistics into its results.

The statistics of a slice (k numbers per row: CE_STATS, LP_STATS) and the formulas that
combine them live in ``rlhf_ops/_vocab_stats.py`` (pure torch, no communication).

Gradients. The combined result is replicated; as in Megatron, every rank back-propagates the
same upstream gradient into it (it computes the same loss from it). The gradient of this rank's
slice is then its own part of the full-vocabulary gradient, and a statistic's gradient is the
row of the gathered gradient that belongs to this rank (``gather_stats``' backward: no
communication). A replicated input feeding every rank's slice (``hidden`` of the linear ops)
sums its gradient over the ranks (``replicated_input`` / ``all_reduce_``).

DTensor: a ``DTensor`` sharded ``Shard(-1)`` on a 1-D mesh (``Shard(0)`` for a weight [V, d]) is
accepted in place of ``process_group`` (``unwrap``); its local tensor and the mesh's group run
the path above and the result comes back as a replicated DTensor, as under ``loss_parallel()``.

Host syncs: for CPU tensors (and with ``RLHF_OPS_DEBUG=1``) step 1 reads the gathered metadata
on the host to check it. For CUDA tensors otherwise nothing is read back: the offset stays on
the device and the kernels read it there; a rank that passes a mismatched shape then is not
caught (set RLHF_OPS_DEBUG=1 while debugging). ``vocab_offset=`` skips step 1's collective
where no check runs.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Callable

import torch
from torch import Tensor

from . import _backend, _checks
from .context_parallel import ulysses_attention, zigzag_merge, zigzag_split  # noqa: F401

# ----------------------------------------------------------------------------- the group ---


def _dist():
    import torch.distributed as dist
    return dist


def group_name(op: str, group) -> str:
    """The name under which the custom ops find ``group`` again (``_resolve_process_group``)."""
    dist = _dist()
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"rlhf_ops.{op}: process_group must be a torch.distributed.ProcessGroup "
                        f"(torch.distributed.group.WORLD for the default group) or None, got "
                        f"{type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"rlhf_ops.{op}: this rank is not a member of process_group")
    return group.group_name


def resolve_group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the group's collectives take tensors: the CPU for gloo, else ``device``."""
    return torch.device("cpu") if _dist().get_backend(group) == "gloo" else device


def _all_gather(x: Tensor, group) -> Tensor:
    """[R, *x.shape]: every rank's ``x`` (same shape on every rank), in rank order."""
    dist = _dist()
    R = dist.get_world_size(group)
    dev = _comm_device(group, x.device)
    out = torch.empty((R * x.numel(),), dtype=x.dtype, device=dev)  # the concatenated form
    # all_gather_single is the name from torch 2.12 on (all_gather_into_tensor warns there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.reshape(-1).contiguous().to(dev), group=group)
    return out.view((R,) + tuple(x.shape)).to(x.device)


def all_reduce_(x: Tensor, group_or_name) -> Tensor:
    """Sum ``x`` over the group, in place (the backward of a replicated input)."""
    group = resolve_group(group_or_name) if isinstance(group_or_name, str) else group_or_name
    dev = _comm_device(group, x.device)
    if dev == x.device:
        _dist().all_reduce(x, group=group)
        return x
    y = x.to(dev)
    _dist().all_reduce(y, group=group)
    return x.copy_(y)


# ------------------------------------------------------------------------------- DTensor ---

def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor, Replicate, Shard


def is_dtensor(x) -> bool:
    t = _dtensor_types()
    return t is not None and isinstance(x, t[0])


def unwrap(op: str, name: str, x, process_group, shard_dim: int):
    """(local tensor, group, mesh): a DTensor sharded on ``shard_dim`` over a 1-D mesh gives its
    local shard and the mesh's group; anything else is returned as it is (mesh None)."""
    if not is_dtensor(x):
        return x, process_group, None
    _, _, Shard = _dtensor_types()
    if process_group is not None:
        raise ValueError(f"rlhf_ops.{op}: {name} is a DTensor, which brings its own process group; "
                         f"pass process_group=None")
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"rlhf_ops.{op}: {name} must be a DTensor on a 1-D device mesh, got a "
                         f"{mesh.ndim}-D mesh")
    want = shard_dim % x.ndim
    p = x.placements[0]
    if not (isinstance(p, Shard) and p.dim % x.ndim == want):
        raise ValueError(f"rlhf_ops.{op}: {name} must be a DTensor sharded over the vocabulary "
                         f"(Shard({shard_dim})), got placements {tuple(x.placements)}")
    return x.to_local(), mesh.get_group(), mesh


def replicated_local(op: str, name: str, t):
    """A replicated DTensor's local tensor (targets, hidden states); anything else unchanged."""
    if t is None or not is_dtensor(t):
        return t
    _, Replicate, _ = _dtensor_types()
    if not all(isinstance(p, Replicate) for p in t.placements):
        raise ValueError(f"rlhf_ops.{op}: {name} must be replicated on every rank (a plain tensor "
                         f"or a Replicate() DTensor), got placements {tuple(t.placements)}")
    return t.to_local()


def wrap(out: Tensor, mesh) -> Tensor:
    """The replicated result as a Replicate() DTensor on ``mesh`` (as loss_parallel() returns)."""
    if mesh is None:
        return out
    DTensor, Replicate, _ = _dtensor_types()
    return DTensor.from_local(out, mesh, [Replicate()], run_check=False)


# ----------------------------------------------------------------- 1. locate the slice ---
# meta row per rank: [V_r, crc32(config), rows, min target, max target, target checksum,
#                     vocab_offset passed (−1: none), inputs rejected by this rank's checks]
_BIG = 2 ** 62


def _meta(target: Tensor, local_vocab: int, ignore_index: int | None, config: str,
          vocab_offset: int) -> Tensor:
    t = target.reshape(-1)
    valid = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    tmin = torch.where(valid, t, _BIG).amin() if t.numel() else torch.tensor(_BIG, device=t.device)
    tmax = torch.where(valid, t, -_BIG).amax() if t.numel() else torch.tensor(-_BIG, device=t.device)
    # checksum of the targets (int64 arithmetic wraps, which is fine for a checksum)
    pos = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.int64)
    tsum = (t * pos).sum() + t.numel()
    head = torch.tensor([local_vocab, zlib.crc32(config.encode()), t.numel()], dtype=torch.int64)
    tail = torch.tensor([vocab_offset, 0], dtype=torch.int64)
    return torch.cat([head.to(t.device), torch.stack([tmin, tmax, tsum]).to(torch.int64),
                      tail.to(t.device)])


def _check_meta(op, name, group, meta, target, ignore_index, config, rank):
    """Raise the same error on every rank when the ranks disagree or a target is out of range.
    Every rank holds the same gathered ``meta``, so every rank reaches the same decision."""
    m = meta.cpu().tolist()
    R = len(m)
    failed = [r for r in range(R) if m[r][7]]
    if failed:
        raise ValueError(f"rlhf_ops.{op}: rank {failed[0]} of process_group rejected its inputs "
                         f"(its own error says why), so every rank stops here")
    if any(row[1] != m[0][1] for row in m):
        # the error path: one more collective (every rank is here) to name what differs
        configs = [None] * R
        _dist().all_gather_object(configs, config, group=group)
        lines = "; ".join(f"rank {r}: {c}" for r, c in enumerate(configs))
        raise ValueError(f"rlhf_ops.{op}: the ranks of process_group passed different shapes or "
                         f"settings (every rank must pass the same leading shape, dtype and "
                         f"options, with its own vocabulary slice): {lines}")
    sizes = [row[0] for row in m]
    V = sum(sizes)
    for r, row in enumerate(m):  # a vocab_offset passed by any rank must be where its slice is
        if row[6] >= 0 and row[6] != sum(sizes[:r]):
            raise ValueError(f"rlhf_ops.{op}: vocab_offset={row[6]} on rank {r}, but the slice "
                             f"sizes of the ranks {sizes} place its slice at {sum(sizes[:r])}")
    bad_ranks = [r for r, row in enumerate(m) if row[3] < 0 or row[4] >= V]
    if bad_ranks:
        if rank in bad_ranks:  # this rank's own targets: the unsharded op's message
            _checks.in_range(op, name, target, 0, V, ignore=ignore_index)
        r = bad_ranks[0]
        bad = m[r][3] if m[r][3] < 0 else m[r][4]
        extra = f" or {ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"rlhf_ops.{op}: {name} holds {bad} (on rank {r}), out of range "
                         f"[0, {V}){extra}")
    if any(row[5] != m[0][5] for row in m):
        diff = [r for r in range(R) if m[r][5] != m[0][5]]
        raise ValueError(f"rlhf_ops.{op}: {name} differs between the ranks of process_group "
                         f"(rank 0 and rank {diff[0]}); vocabulary parallelism needs the same "
                         f"{name} on every rank")


@torch.library.custom_op("rlhf_ops::vocab_shard_offset", mutates_args=())
def shard_offset(target: Tensor, local_vocab: int, ignore_index: int | None, vocab_offset: int,
                 op: str, name: str, config: str, group: str) -> Tensor:
    """int64 [1] on the target's device: where this rank's vocabulary slice starts.

    One all_gather of a few int64 per rank (skipped when ``vocab_offset`` ≥ 0 is given and no
    check runs). For CPU tensors, or with RLHF_OPS_DEBUG=1, the gathered rows are checked on the
    host: same ``config`` (leading shape, dtype, options) and targets on every rank, targets in
    [0, V) — a ValueError on every rank otherwise."""
    check = _backend.debug_checks(target.device)
    if vocab_offset >= 0 and not check:
        return torch.full((1,), vocab_offset, dtype=torch.int64, device=target.device)
    pg = resolve_group(group)
    rank = _dist().get_rank(pg)
    meta = _all_gather(_meta(target, local_vocab, ignore_index, config, vocab_offset), pg)
    if check:
        _check_meta(op, name, pg, meta, target, ignore_index, config, rank)
    if vocab_offset >= 0:
        return torch.full((1,), vocab_offset, dtype=torch.int64, device=target.device)
    return meta[:rank, 0].sum().reshape(1)


@shard_offset.register_fake
def _(target, local_vocab, ignore_index, vocab_offset, op, name, config, group):
    return target.new_empty((1,), dtype=torch.int64)


@contextlib.contextmanager
def rejects_together(op: str, group, device):
    """Wrap a vocabulary-parallel call's own input checks. When they reject this rank's inputs,
    this rank still takes part in ``shard_offset``'s all_gather (flagging the failure) before
    it raises, so the other ranks raise too instead of waiting for it (where checks run: CPU
    tensors, or RLHF_OPS_DEBUG=1)."""
    if group is None:
        yield
        return
    gname = group_name(op, group)   # a bad group raises here, before anything is gathered
    try:
        yield
    except (TypeError, ValueError, RuntimeError):
        device = device if isinstance(device, torch.device) else torch.device("cpu")
        if device.type != "meta" and _backend.debug_checks(device):
            pg = resolve_group(gname)
            row = torch.tensor([0, 0, 0, _BIG, -_BIG, 0, -1, 1], dtype=torch.int64, device=device)
            _all_gather(row, pg)
        raise


def check_vocab_offset(op: str, vocab_offset, group) -> None:
    if vocab_offset is None:
        return
    if isinstance(vocab_offset, bool) or not isinstance(vocab_offset, int) or vocab_offset < 0:
        kind = ValueError if isinstance(vocab_offset, int) and not isinstance(vocab_offset, bool) else TypeError
        raise kind(f"rlhf_ops.{op}: vocab_offset must be None or an int >= 0 (the global "
                   f"id of this rank's first vocabulary entry), got {vocab_offset!r}")
    if group is None:
        raise ValueError(f"rlhf_ops.{op}: vocab_offset needs a process_group (or a DTensor input)")


def locate(op: str, name: str, group, target: Tensor, local_vocab: int, *, ignore_index=None,
           vocab_offset=None, config: str = "") -> tuple[str, Tensor]:
    """(group name, offset int64 [1]) for this rank's slice; checks as ``shard_offset``."""
    gname = group_name(op, group)
    if target.device.type == "meta":
        return gname, target.new_zeros((1,), dtype=torch.int64)
    off = torch.ops.rlhf_ops.vocab_shard_offset(target, int(local_vocab), ignore_index,
                                                -1 if vocab_offset is None else int(vocab_offset),
                                                op, name, config, gname)
    return gname, off


# ------------------------------------------------------------ 3. gather the statistics ---

class _GatherStats(torch.autograd.Function):
    """stats [k, N] of this rank → [R, k, N] of every rank, plus the slice sizes [R] (which ride
    along as one extra number). Backward: this rank's row of the gradient (see the module
    docstring: every rank back-propagates the same gradient through the same combination)."""

    @staticmethod
    def forward(ctx, stats, local_vocab, group):
        k, n = stats.shape
        flat = torch.cat([stats.reshape(-1), stats.new_full((1,), float(local_vocab))])
        if stats.device.type == "meta":
            out = flat.new_empty((_dist().get_world_size(group), flat.numel()))
        else:
            out = _all_gather(flat, group)
        ctx.rank = _dist().get_rank(group)
        ctx.set_materialize_grads(False)
        sizes = out[:, -1]
        ctx.mark_non_differentiable(sizes)
        return out[:, :-1].reshape(out.shape[0], k, n), sizes

    @staticmethod
    def backward(ctx, grad, _):
        return (None if grad is None else grad[ctx.rank]), None, None


def gather_stats(stats: Tensor, local_vocab: int, group) -> tuple[Tensor, Tensor]:
    """(every rank's stats [R, k, N], slice sizes [R] in the stats dtype)."""
    if isinstance(group, str):
        group = resolve_group(group)
    return _GatherStats.apply(stats, local_vocab, group)


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (a replicated input that
    feeds every rank's vocabulary slice, e.g. the hidden states of a column-parallel head)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


def replicated_input(x: Tensor, group) -> Tensor:
    return _ReplicatedInput.apply(x, group)


# ------------------------------------------------------------ 0–4. one op's whole call ---

def settings(op: str, what: str, shape, dtype, **options) -> str:
    """What every rank of a call must pass alike, as one line (checked by ``shard_offset``, quoted
    in its error): ``op(<what> shape (...), <dtype>, key=value, ...)``."""
    opts = "".join(f", {k}={v}" for k, v in options.items())
    return f"{op}({what} shape {tuple(shape)}, {str(dtype).replace('torch.', '')}{opts})"


class VocabCall:
    """One call of a vocabulary op, steps 0–4 of the module docstring. The op module gives its
    input checks, its slice statistics and its combination; this class does the rest:

        call = distributed.VocabCall(op, "logits", logits, -1, process_group, vocab_offset)
        logits = call.local                          # the DTensor's local shard, or logits itself
        with call.checks():                          # a rejection stops every rank, not one
            tokens = call.replicated("tokens", tokens)
            ...the op's own checks; the backend...
        if call.parallel:
            return call.wrap(call.run(be, "tokens", t, V_r, config, reference=..., fused=...))

    ``process_group`` None and no DTensor: ``parallel`` is False and the op runs unsharded."""

    def __init__(self, op: str, name: str, x, shard_dim: int, process_group, vocab_offset):
        self.op, self.name, self.shard_dim, self.vocab_offset = op, name, shard_dim, vocab_offset
        self.local, self.group, self.mesh = unwrap(op, name, x, process_group, shard_dim)

    @property
    def parallel(self) -> bool:
        return self.group is not None

    def sharded(self, name: str, t, *, together: bool = False):
        """Another input sharded like the first one (``ref_logits``, ``bias``): its local shard
        when the call came with DTensors. ``together``: it must be a DTensor exactly when the
        first input is one (checked inside ``checks``)."""
        if together and is_dtensor(t) != (self.mesh is not None):
            raise ValueError(f"rlhf_ops.{self.op}: {self.name} and {name} must both be DTensors "
                             f"(sharded Shard({self.shard_dim}) on one mesh) or both plain tensors")
        if self.mesh is None or t is None:
            return t
        return unwrap(self.op, name, t, None, self.shard_dim)[0]

    def replicated(self, name: str, t):
        """An input every rank holds whole (targets, tokens, hidden states, a mask)."""
        return replicated_local(self.op, name, t)

    @contextlib.contextmanager
    def checks(self):
        """Wrap the op's own input checks (``rejects_together``); ``vocab_offset`` is checked
        last."""
        with rejects_together(self.op, self.group, getattr(self.local, "device", None)):
            yield
            check_vocab_offset(self.op, self.vocab_offset, self.group)

    def run(self, backend: str, name: str, target: Tensor, local_vocab: int, config: str, *,
            ignore_index: int | None = None, reference: Callable, combine: Callable,
            fused: Callable):
        """Steps 1–3: locate the slice (``name``d ``target``: global ids), then
        ``reference(offset)`` → the slice's statistics [k, N] (eager, differentiable), gathered
        and ``combine(G, sizes)``d here; or ``fused(group_name, offset)``: the op's custom op,
        which runs its kernels on the slice and calls ``combine_slices`` itself."""
        gname, offset = locate(self.op, name, self.group, target, local_vocab,
                               ignore_index=ignore_index, vocab_offset=self.vocab_offset,
                               config=config)
        if backend == "reference":
            return combine_slices(reference(offset), local_vocab, self.group, combine)
        return fused(gname, offset)

    def wrap(self, out):
        """Step 4: the replicated results as replicated DTensors when the inputs were DTensors
        (as ``loss_parallel()``); a tuple (or named tuple) element by element."""
        if isinstance(out, tuple):
            items = [o if o is None else wrap(o, self.mesh) for o in out]
            return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
        return wrap(out, self.mesh)


def combine_slices(stats: Tensor, local_vocab: int, group, combine: Callable):
    """Step 3: this rank's slice statistics [k, N] gathered from every rank ([R, k, N], with the
    slice sizes [R]) and combined by the op's ``combine(G, sizes)``."""
    G, sizes = gather_stats(stats, local_vocab, group)
    return combine(G, sizes)


# --------------------------------------------------- a replicated weight, split by rows ---

def balanced_split(V: int, world: int) -> list[int]:
    """Slice sizes of V rows over ``world`` ranks: V // world each, one more for the first
    V % world ranks."""
    return [V // world + (1 if r < V % world else 0) for r in range(world)]


class _SliceOfReplicated(torch.autograd.Function):
    """Forward: this rank's rows [o_r, o_r + V_r) of a weight every rank holds whole (a tied
    embedding). Backward: every rank's slice gradient, all-gathered into the whole [V, d], so the
    replicated weight gets the same, full gradient on every rank (V·d numbers per step: the cost
    of keeping a vocabulary-parallel head tied to a replicated embedding)."""

    @staticmethod
    def forward(ctx, weight, group):
        R, r = _dist().get_world_size(group), _dist().get_rank(group)
        sizes = balanced_split(weight.shape[0], R)
        ctx.group, ctx.sizes = group, sizes
        off = sum(sizes[:r])
        return weight[off:off + sizes[r]].clone()

    @staticmethod
    def backward(ctx, grad):
        m = max(ctx.sizes)
        pad = grad.new_zeros((m,) + tuple(grad.shape[1:]))
        pad[:grad.shape[0]] = grad
        parts = _all_gather(pad, ctx.group)                # [R, m, d]
        return torch.cat([parts[r, :n] for r, n in enumerate(ctx.sizes)]), None


def split_replicated(weight: Tensor, group) -> tuple[Tensor, int]:
    """(this rank's rows of ``weight``, their first global id) for a weight held whole on every
    rank of ``group``, split as ``balanced_split``; the gradient reaches the whole weight on every
    rank (see ``_SliceOfReplicated``). For a head whose weight is also the input embedding."""
    R, r = _dist().get_world_size(group), _dist().get_rank(group)
    return _SliceOfReplicated.apply(weight, group), sum(balanced_split(weight.shape[0], R)[:r])
