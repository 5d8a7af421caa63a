"""Context parallelism: attention over a sequence split across the ranks of a ``torch.distributed``
group, and the LM head's weight when FSDP2 shards it.

    out = ro.attention(q, k, v, causal=True, cp_group=group, cp_layout="zigzag")   # ring
    out = ro.attention_varlen(q, k, v, cu, cu, max_len, max_len, cp_group=group)   # gather K/V
    out = ulysses_attention(q, k, v, group, attn=ro.attention, **kwargs)          # all-to-all
    q_local = zigzag_split(q, group, dim=2);  q = zigzag_merge(q_local, group, dim=2)

Layouts (W ranks, this rank r): the global sequence is cut into 2W equal chunks; "zigzag" gives
rank r chunks r and 2W−1−r (in that order), so under a causal mask every rank does the same
work; "contiguous" gives rank r the r-th of W equal chunks. The output is this rank's part of the
full-sequence result (same layout as q), and the gradients are exact.

Ring (dense ``attention``). K/V travel round the group (``batch_isend_irecv`` to rank r + 1, from
rank r − 1; the transfer of the next block is in flight while the current one is computed). Per
(q chunk, kv chunk) pair the existing fused forward (``rlhf_ops::attention_fwd``) runs on the part
of the pair the global mask lets through (``block_spec``: a window in the chunk's coordinates,
with leading queries or keys trimmed so that bottom-right alignment expresses any offset), and
returns the block's output and its base-2 log-sum-exp pair (m, log2 l). Blocks combine as
    Mn = max(M, m),  e_old = M − Mn + L2,  e_new = m − Mn + l2,  L2n = log2(2^e_old + 2^e_new)
    O  = 2^(e_old − L2n)·O + 2^(e_new − L2n)·o
kept in fp32 (fp64 for fp64 inputs). Backward: every block's fused backward
(``rlhf_ops::attention_bwd``) is given the *global* (M, L2) and the global output, so its
p = 2^(u − M − L2) are the global probabilities and delta = Σ dO·O the global one: dQ of the
block adds up locally, dK/dV accumulate in a buffer that travels round the ring with the block and
arrives back at its owner after W hops. No tensor is ever [T, S]: the fused kernels work in tiles,
the reference backend (eager) materialises one chunk pair [c, c] at a time.

Varlen (``attention_varlen``): every packed sequence is split zigzag (its length divisible by 2W;
cu_seqlens and max_seqlen are the rank's local ones, the same on every rank). Each rank
all-gathers K and V (one ``all_gather`` each) and runs one varlen call in which every local query
chunk is its own sequence against the prefix of its sequence's keys that ends where the chunk
ends (bottom-right causal alignment is then exact). Memory per layer, per rank: the gathered K/V of
the whole packed batch (2·N·Hkv·D elements) and the prefixes ((2W + 1)/(2W) of it, causal;
non-causal reads the gathered keys in sequence order, 1×), freed after the call; only the local
K/V are saved for backward, which gathers them again and returns dK/dV by ``reduce_scatter``.

Ulysses: ``all_to_all`` from [sequence slice, all heads] to [whole sequence, H/W heads], any
rlhf_ops attention on that (dense, varlen, window, softcap: ``**kwargs`` pass through), and the
inverse ``all_to_all`` back; the backward of each all-to-all is the inverse all-to-all.

FSDP2 weights: ``fsdp_gather(op, name, weight)`` turns fully_shard's Shard(0) DTensor into the whole
weight (all_gather); its backward reduce-scatters the gradient, divides by W (FSDP2's mean) and
returns it as a Shard(0) DTensor, so the parameter's ``.grad`` is what FSDP2's own reduction
would have produced.

Errors: argument checks run on every rank; for CPU tensors (and with RLHF_OPS_DEBUG=1) the ranks
then exchange a few int64 (``together``) so that a rank whose inputs were rejected, or ranks that
passed different shapes or settings, make every rank raise instead of hanging in a collective.
For CUDA tensors without RLHF_OPS_DEBUG nothing is exchanged (it would be a host sync).

Custom ops (``torch.library``, fake impls, autograd): ``rlhf_ops::ring_attention_fwd/_bwd``,
``rlhf_ops::cp_attention_varlen_fwd/_bwd``, ``rlhf_ops::cp_all_to_all``. Their group argument
is the process group's name. ``comm_bytes()`` counts what this rank sends (the bench prints it).
"""
from __future__ import annotations

import contextlib
import importlib
import zlib

import torch
from torch import Tensor

from . import _backend, _checks, reference

# the module (the package's ``attention`` attribute is the function of the same name)
_attn = importlib.import_module(__package__ + ".attention")

LOG2E = 1.4426950408889634
LAYOUTS = ("zigzag", "contiguous")
WEIGHT_SHARDS = ("vocab", "fsdp")


def _dist():
    import torch.distributed as dist
    return dist


# ------------------------------------------------------------------------------- the group ---

def group_name(op: str, group, arg: str = "cp_group") -> str:
    dist = _dist()
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"rlhf_ops.{op}: {arg} must be a torch.distributed.ProcessGroup "
                        f"(torch.distributed.group.WORLD for the default group), got "
                        f"{type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"rlhf_ops.{op}: this rank is not a member of {arg}")
    return group.group_name


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the group's communication takes tensors: the CPU for gloo, else ``device``."""
    return torch.device("cpu") if _dist().get_backend(group) == "gloo" else device


_SENT = [0]   # bytes this process has sent through this module (``comm_bytes``)


@contextlib.contextmanager
def comm_bytes():
    """``with comm_bytes() as sent: ...; sent[0]`` = bytes this rank sent inside the block (P2P:
    the tensor; all_gather: (W − 1)× its input; all_to_all / reduce_scatter: (W − 1)/W of it —
    what a ring or pairwise algorithm puts on the wire). The argument check's exchange (16 bytes
    to each other rank per call, CPU tensors and RLHF_OPS_DEBUG=1 only) is not counted."""
    start = _SENT[0]
    box = [0]
    try:
        yield box
    finally:
        box[0] = _SENT[0] - start


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _all_gather(x: Tensor, group, count: bool = True) -> Tensor:
    """[W, *x.shape]: every rank's ``x`` (same shape everywhere), in rank order. ``count=False``:
    not added to ``comm_bytes`` (the argument check's few int64, not the algorithm's traffic)."""
    dist = _dist()
    W = dist.get_world_size(group)
    dev = _comm_device(group, x.device)
    out = torch.empty((W * x.numel(),), dtype=x.dtype, device=dev)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.reshape(-1).contiguous().to(dev), group=group)
    _SENT[0] += (W - 1) * _nbytes(x) if count else 0
    return out.view((W,) + tuple(x.shape)).to(x.device)


def _reduce_scatter(x: Tensor, group) -> Tensor:
    """x [W, *s] on every rank → Σ over ranks of x[this rank]: [*s]."""
    dist = _dist()
    W = x.shape[0]
    dev = _comm_device(group, x.device)
    out = torch.empty((x[0].numel(),), dtype=x.dtype, device=dev)     # flat: [W·n] → [n]
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x.reshape(-1).contiguous().to(dev), group=group)
    _SENT[0] += (W - 1) * _nbytes(out)
    return out.view(tuple(x.shape[1:])).to(x.device)


def _all_to_all(x: Tensor, group) -> Tensor:
    """x [W, *s]: send x[i] to rank i; returns [W, *s] with row i from rank i."""
    dist = _dist()
    dev = _comm_device(group, x.device)
    out = torch.empty(tuple(x.shape), dtype=x.dtype, device=dev)
    dist.all_to_all_single(out, x.contiguous().to(dev), group=group)
    _SENT[0] += (x.shape[0] - 1) * _nbytes(x[0]) if x.shape[0] else 0
    return out.to(x.device)


class _RingPass:
    """Send ``x`` to the next rank of the group and receive the previous rank's tensor of the same
    shape, asynchronously (``wait()`` returns it)."""

    def __init__(self, x: Tensor, group):
        dist = _dist()
        W, r = dist.get_world_size(group), dist.get_rank(group)
        self.device = x.device
        dev = _comm_device(group, x.device)
        send = x.contiguous().to(dev)
        self.recv = torch.empty_like(send)
        nxt, prv = dist.get_global_rank(group, (r + 1) % W), dist.get_global_rank(group, (r - 1) % W)
        ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, self.recv, prv, group)]
        self.reqs = dist.batch_isend_irecv(ops)
        self._keep = send
        _SENT[0] += _nbytes(send)

    def wait(self) -> Tensor:
        for req in self.reqs:
            req.wait()
        return self.recv.to(self.device)


# ---------------------------------------------------------------- errors on every rank ---

def _meta_row(failed: bool, config: str) -> Tensor:
    return torch.tensor([int(failed), zlib.crc32(config.encode())], dtype=torch.int64)


@contextlib.contextmanager
def together(op: str, group, device: torch.device, arg: str = "cp_group"):
    """Run a call's argument checks inside the block; ``box[0]`` = its config string (shapes,
    dtypes, options that every rank must share). Where checks run (CPU tensors,
    RLHF_OPS_DEBUG=1), the ranks then all-gather (failed, crc32(config)): a rank that raised makes
    every rank raise, and so do ranks whose configs differ (named in the message)."""
    group_name(op, group, arg)               # a bad group raises here, before any collective
    run = device.type != "meta" and _backend.debug_checks(device) and not torch.compiler.is_compiling()
    box = [""]
    try:
        yield box
    except (TypeError, ValueError, RuntimeError):
        if run:
            _all_gather(_meta_row(True, ""), group, count=False)
        raise
    if not run:
        return
    rows = _all_gather(_meta_row(False, box[0]), group, count=False).tolist()
    failed = [i for i, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(f"rlhf_ops.{op}: rank {failed[0]} of {arg} rejected its inputs (its own "
                         f"error says why), so every rank stops here")
    if any(row[1] != rows[0][1] for row in rows):
        configs = [None] * len(rows)
        _dist().all_gather_object(configs, box[0], group=group)
        lines = "; ".join(f"rank {i}: {c}" for i, c in enumerate(configs))
        raise ValueError(f"rlhf_ops.{op}: the ranks of {arg} passed different shapes or settings "
                         f"(every rank must pass the same shapes, dtype and options): {lines}")


# ------------------------------------------------------------------------------- layouts ---

def _world(group) -> tuple[int, int]:
    dist = _dist()
    return dist.get_world_size(group), dist.get_rank(group)


def _zigzag_positions(cu_local: Tensor, W: int, r: int, n_local: int) -> Tensor:
    """For each local packed token: its position in the global packed tensor (every sequence
    split zigzag: local part = chunks r and 2W−1−r of 2W equal chunks). Shapes only, no host
    read: cu_local int [n + 1] on the device."""
    cu = cu_local.long()
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens,
                                  output_size=n_local)
    u = torch.arange(n_local, device=cu.device) - cu[seq]      # offset in the local part
    c = lens[seq] // 2
    second = u >= c
    chunk = torch.where(second, 2 * W - 1 - r, torch.full_like(u, r))
    return W * cu[seq] + chunk * c + torch.where(second, u - c, u)


def _holder_positions(g: Tensor, seq: Tensor, cu_local: Tensor, W: int, n_local: int) -> Tensor:
    """Global position ``g`` inside packed sequence ``seq`` → its index in the all-gathered
    [W·n_local] buffer (rank-major, each rank's zigzag part of every sequence)."""
    cu = cu_local.long()
    c = ((cu[1:] - cu[:-1]) // 2)[seq].clamp(min=1)
    chunk = g // c
    u = g - chunk * c
    second = chunk >= W
    rank = torch.where(second, 2 * W - 1 - chunk, chunk)
    return rank * n_local + cu[seq] + second.long() * c + u


def _zigzag_chunk(W: int, dim_name: str, op: str, size: int) -> int:
    if size % (2 * W):
        raise ValueError(f"rlhf_ops.{op}: {dim_name} ({size}) must be divisible by 2·W = {2 * W} "
                         f"(W = {W} ranks)")
    return size // (2 * W)


def zigzag_split(x: Tensor, group, dim: int, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """This rank's chunks r and 2W−1−r (in that order) of 2W equal chunks of ``x`` along ``dim``.

    With ``cu_seqlens`` (int32 [n + 1], the global packed layout along ``dim``), every packed
    sequence is split that way (each length divisible by 2W); the local cu_seqlens are
    ``cu_seqlens // W``. A view-free copy; differentiable (the gradient lands in this rank's
    chunks)."""
    op = "zigzag_split"
    _checks.tensor(op, "x", x, min_ndim=1)
    group_name(op, group, "group")
    W, r = _world(group)
    dim = dim % x.dim()
    if cu_seqlens is None:
        c = _zigzag_chunk(W, f"x.shape[{dim}]", op, x.shape[dim])
        return torch.cat([x.narrow(dim, r * c, c), x.narrow(dim, (2 * W - 1 - r) * c, c)], dim)
    _check_split_cu(op, cu_seqlens, x.shape[dim], W, dim)
    n_local = x.shape[dim] // W
    pos = _zigzag_positions(cu_seqlens // W, W, r, n_local)
    return x.index_select(dim, pos)


def zigzag_merge(x_local: Tensor, group, dim: int, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """The full tensor from every rank's ``zigzag_split`` part (one all_gather). ``cu_seqlens``:
    the *local* cu_seqlens of a packed layout (as passed to ``attention_varlen`` with cp_group).
    Differentiable: every rank is taken to use the same merged tensor (as a replicated result),
    so the gradient of this rank's part is its chunks of the merged tensor's gradient."""
    op = "zigzag_merge"
    _checks.tensor(op, "x_local", x_local, min_ndim=1)
    gname = group_name(op, group, "group")
    dim = dim % x_local.dim()
    if cu_seqlens is None:
        if x_local.shape[dim] % 2:
            raise ValueError(f"rlhf_ops.{op}: x_local.shape[{dim}] ({x_local.shape[dim]}) must be "
                             f"even (chunks r and 2W−1−r of equal size)")
    else:
        _check_split_cu(op, cu_seqlens, x_local.shape[dim], 1, dim, local=True)
    return _ZigzagMerge.apply(x_local, gname, dim, cu_seqlens)


def _check_split_cu(op, cu, N, W, dim, local=False):
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.shape[0] == 0 or cu.dtype not in (
            torch.int32, torch.int64):
        raise TypeError(f"rlhf_ops.{op}: cu_seqlens must be an int32 tensor [n + 1], got "
                        f"{type(cu).__name__ if not isinstance(cu, Tensor) else (cu.dtype, tuple(cu.shape))}")
    if N % (W if not local else 1):
        raise ValueError(f"rlhf_ops.{op}: the packed length ({N}) must be divisible by W = {W}")
    if _backend.debug_checks(cu.device) and not torch.compiler.is_compiling():
        c = cu.cpu().long()
        lens = c[1:] - c[:-1]
        parts = 2 if local else 2 * W
        if int(c[0]) != 0 or int(c[-1]) != N or (lens.numel() and int(lens.min()) < 0):
            raise ValueError(f"rlhf_ops.{op}: cu_seqlens must run from 0 to the packed length "
                             f"x.shape[{dim}] = {N}, non-decreasing, got {c.tolist()}")
        if lens.numel() and bool((lens % parts != 0).any()):
            raise ValueError(f"rlhf_ops.{op}: every sequence length must be divisible by {parts}"
                             f"{' (2·W)' if not local else ''}, got lengths {lens.tolist()}")


class _ZigzagMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gname, dim, cu):
        pg = _group(gname)
        W, r = _world(pg)
        ctx.dim, ctx.W, ctx.r, ctx.cu = dim, W, r, cu
        parts = _all_gather(x.movedim(dim, 0), pg)              # [W, n_local, ...]
        n = x.shape[dim]
        if cu is None:                                          # [W, 2, c] → chunk order
            c = n // 2
            p = parts.reshape((W, 2, c) + tuple(parts.shape[2:]))
            full = torch.cat([p[:, 0].reshape((W * c,) + tuple(p.shape[3:])),
                              p.flip(0)[:, 1].reshape((W * c,) + tuple(p.shape[3:]))])
        else:
            flat = parts.reshape((W * n,) + tuple(parts.shape[2:]))
            # global token g ← gathered index of its holder: invert the per-rank positions
            src = torch.cat([_zigzag_positions(cu, W, i, n) for i in range(W)])
            full = torch.empty_like(flat)
            full[src] = flat
        return full.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        g = grad.movedim(ctx.dim, 0)
        W, r = ctx.W, ctx.r
        if ctx.cu is None:
            c = g.shape[0] // (2 * W)
            out = torch.cat([g[r * c:(r + 1) * c], g[(2 * W - 1 - r) * c:(2 * W - r) * c]])
        else:
            out = g[_zigzag_positions(ctx.cu, W, r, g.shape[0] // W)]
        return out.movedim(0, ctx.dim), None, None, None


# ------------------------------------------------------------------------ attention blocks ---

def _band(lo, hi, c: int):
    """The offsets j − i ∈ [lo, hi] (None = unbounded) that occur in a c×c block, or None."""
    lo = -(c - 1) if lo is None else max(lo, -(c - 1))
    hi = c - 1 if hi is None else min(hi, c - 1)
    return None if lo > hi else (lo, hi)


def block_spec(d: int, c: int, left: int, right: int):
    """The part of one (q chunk, kv chunk) pair the global mask lets through, as a kernel call.

    Both chunks hold c tokens; the q chunk starts d tokens after the kv chunk (query i, key j of
    the pair are global i + qo, j + ko, d = qo − ko). The global window (flash-attn's, −1 =
    unbounded; causal is right = 0, and T = S globally) admits j − i ∈ [d − left, d + right].
    Returns None when no pair does, else (t, s, left', right'): run the bottom-right aligned
    kernel on the first t queries and the first s keys with window (left', right'), which admits
    j − i − (s − t) ∈ [−left', right']. Trimming t (or s) shifts the alignment by δ = s − t, so
    an offset the window alone cannot express (every visible key after the query: δ > 0;
    before it: δ < 0) is exact; the trimmed rows (keys) see (are seen by) nothing."""
    band = _band(d - left if left >= 0 else None, d + right if right >= 0 else None, c)
    if band is None:
        return None
    lo, hi = band
    delta = min(max(0, lo), hi)                 # 0 when it can be, else the nearest bound
    t, s = (c - delta, c) if delta > 0 else (c, c + delta)
    lft, rgt = delta - lo, hi - delta
    # kernel coordinates x = j − i − δ lie in [−(s − 1), t − 1]: a bound there excludes nothing
    return t, s, (-1 if lft >= s - 1 else lft), (-1 if rgt >= t - 1 else rgt)


def _eager_fwd(q, k, v, visible, scale, softcap):
    """softmax attention of blocks q [..., Hq, t, D], k/v [..., Hkv, s, D] under ``visible``
    [..., 1, t, s] (eager, the accumulation dtype) → (out like q, (m, log2 l) [2, ..., Hq, t]) in
    the fused kernels' convention (base 2; (+inf, 0) for a row that sees no key)."""
    acc = _checks.acc_dtype(q.dtype)
    G = q.shape[-3] // k.shape[-3]
    kk = k.to(acc).repeat_interleave(G, dim=-3)
    vv = v.to(acc).repeat_interleave(G, dim=-3)
    s = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    u = (s * LOG2E).masked_fill(~visible, float("-inf"))
    m = u.amax(-1)
    empty = m == float("-inf")
    p = torch.exp2(u - torch.where(empty, torch.zeros_like(m), m)[..., None])
    l = p.sum(-1)
    one = torch.ones_like(l)
    o = torch.matmul(p, vv) / torch.where(empty, one, l)[..., None]
    o = torch.where(empty[..., None], torch.zeros_like(o), o)
    lse = torch.stack([torch.where(empty, torch.full_like(m, float("inf")), m),
                       torch.log2(torch.where(empty, one, l))])
    return o.to(q.dtype), lse


def _eager_bwd(dout, q, k, v, out, lse, visible, scale, softcap):
    """The backward of ``_eager_fwd``'s attention given the global (m, log2 l) and output: the
    same formulas as the fused backward (p = 2^(u − m − log2 l), delta = Σ dO·O)."""
    acc = _checks.acc_dtype(q.dtype)
    Hq, Hkv = q.shape[-3], k.shape[-3]
    G = Hq // Hkv
    qa, do, oa = q.to(acc), dout.to(acc), out.to(acc)
    kk = k.to(acc).repeat_interleave(G, dim=-3)
    vv = v.to(acc).repeat_interleave(G, dim=-3)
    s = torch.matmul(qa, kk.transpose(-1, -2)) * scale
    dcap = None
    if softcap > 0:
        th = torch.tanh(s / softcap)
        s, dcap = softcap * th, 1 - th * th
    u = (s * LOG2E).masked_fill(~visible, float("-inf"))
    p = torch.exp2(u - lse[0][..., None] - lse[1][..., None])
    p = torch.where(visible, p, torch.zeros_like(p))              # (+inf row: −inf − inf = NaN-free)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vv.transpose(-1, -2))
    delta = (do * oa).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if dcap is not None:
        ds = ds * dcap
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qa) * scale

    def fold(x):   # [..., Hq, s, D] → [..., Hkv, s, D]: sum over the G query heads of a kv head
        return x.unflatten(-3, (Hkv, G)).sum(-3)
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def _dense_visible(t, s, left, right, device):
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return reference._visible(i, j, t, s, left, right)


def _block_fwd(be, q, k, v, scale, left, right, softcap):
    """(out [B, Hq, t, D], lse [2, B, Hq, t]) of one block, kernel window (left, right)."""
    if be == "reference":
        return _eager_fwd(q, k, v, _dense_visible(q.shape[2], k.shape[2], left, right, q.device),
                          scale, softcap)
    causal = right == 0 and left == -1
    return torch.ops.rlhf_ops.attention_fwd(q, k, v, causal, scale, left, right, softcap, be)


def _block_bwd(be, dout, q, k, v, out, lse, scale, left, right, softcap):
    lse = lse.contiguous()
    if be == "reference":
        vis = _dense_visible(q.shape[2], k.shape[2], left, right, q.device)
        return _eager_bwd(dout, q, k, v, out, lse, vis, scale, softcap)
    causal = right == 0 and left == -1
    return torch.ops.rlhf_ops.attention_bwd(dout, q, k, v, out, lse, causal, scale, left, right,
                                            softcap, be)


def _merge(O, M, L2, o, lse):
    """Fold a block (o, (m, log2 l)) into the running (O, M, L2) in place (see the module
    docstring; a row that saw no key so far has M = −inf, L2 = 0, O = 0)."""
    m = torch.where(lse[0] == float("inf"), torch.full_like(lse[0], float("-inf")), lse[0])
    Mn = torch.maximum(M, m)
    safe = torch.where(Mn == float("-inf"), torch.zeros_like(Mn), Mn)
    e_old, e_new = M - safe + L2, m - safe + lse[1]
    L2n = torch.logaddexp2(e_old, e_new)
    none = L2n == float("-inf")
    w_old = torch.where(none, torch.zeros_like(L2n), torch.exp2(e_old - L2n))
    w_new = torch.where(none, torch.zeros_like(L2n), torch.exp2(e_new - L2n))
    O.mul_(w_old[..., None]).add_(w_new[..., None] * o.to(O.dtype))
    M.copy_(torch.where(none, M, Mn))
    L2.copy_(torch.where(none, L2, L2n + (Mn - safe)))   # Mn − safe = 0 where Mn is finite


def _chunks(W: int, r: int, T_local: int, zigzag: bool) -> tuple[int, list]:
    """(chunk length c, [(local start, global start)]) of rank r's part of the sequence."""
    if zigzag:
        c = T_local // 2
        return c, [(0, r * c), (c, (2 * W - 1 - r) * c)]
    return T_local, [(0, r * T_local)]


def _pairs(W, r, j, T_local, zigzag, left, right):
    """The blocks (q start, t, kv start, s, left', right') rank r computes against rank j's K/V:
    one call over every chunk pair that takes part when a plain or causal call on that rectangle
    admits exactly what each pair needs (zigzag without a window: the local causal block, [2c × c]
    or [c × 2c] full blocks), else one call per pair (``block_spec``)."""
    c, qs = _chunks(W, r, T_local, zigzag)
    _, ks = _chunks(W, j, T_local, zigzag)
    need = {(q0, k0): _band(qo - ko - left if left >= 0 else None,
                            qo - ko + right if right >= 0 else None, c)
            for q0, qo in qs for k0, ko in ks}
    used = [p for p, band in need.items() if band is not None]
    if not used:
        return []
    q_lo, q_hi = min(p[0] for p in used), max(p[0] for p in used) + c
    k_lo, k_hi = min(p[1] for p in used), max(p[1] for p in used) + c
    T, S = q_hi - q_lo, k_hi - k_lo
    for lft, rgt in ((-1, -1), (-1, 0)):
        def admits(q0, k0):          # what the merged call admits inside pair (q0, k0)
            base = (q0 - q_lo) - (k0 - k_lo) + (S - T)
            return _band(base - lft if lft >= 0 else None, base + rgt if rgt >= 0 else None, c)
        if all(admits(q0, k0) == need[(q0, k0)] for q0 in range(q_lo, q_hi, c)
               for k0 in range(k_lo, k_hi, c) if (q0, k0) in need):
            return [(q_lo, T, k_lo, S, lft, -1 if rgt >= T - 1 else rgt)]
    out = []
    for q0, qo in qs:
        for k0, ko in ks:
            spec = block_spec(qo - ko, c, left, right)
            if spec is not None:
                t, s, lft, rgt = spec
                # trimmed queries are the chunk's last ones (δ > 0); trimmed keys its last ones
                out.append((q0, t, k0, s, lft, rgt))
    return out


# ------------------------------------------------------------------- ring: custom ops ---

@torch.library.custom_op("rlhf_ops::ring_attention_fwd", mutates_args=())
def ring_attention_fwd(q: Tensor, k: Tensor, v: Tensor, group: str, zigzag: bool, scale: float,
                       left: int, right: int, softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    """This rank's q [B, Hq, Tl, D], k/v [B, Hkv, Tl, D] of a sequence split over the group →
    (out [B, Hq, Tl, D], global lse [2, B, Hq, Tl] = (m, log2 l), acc dtype). ``left``/``right``:
    the global window, causal folded in (right = 0)."""
    pg = _group(group)
    W, r = _world(pg)
    B, Hq, Tl, D = q.shape
    acc = _checks.acc_dtype(q.dtype)
    O = torch.zeros((B, Hq, Tl, D), dtype=acc, device=q.device)
    M = torch.full((B, Hq, Tl), float("-inf"), dtype=acc, device=q.device)
    L2 = torch.zeros((B, Hq, Tl), dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    for step in range(W):
        j = (r - step) % W
        nxt = _RingPass(kv, pg) if step < W - 1 else None      # in flight while we compute
        for q0, t, k0, s, lft, rgt in _pairs(W, r, j, Tl, zigzag, left, right):
            o, lse = _block_fwd(backend, q[:, :, q0:q0 + t], kv[0][:, :, k0:k0 + s],
                                kv[1][:, :, k0:k0 + s], scale, lft, rgt, softcap)
            rows = slice(q0, q0 + t)
            _merge(O[:, :, rows], M[:, :, rows], L2[:, :, rows], o, lse)
        if nxt is not None:
            kv = nxt.wait()
    empty = M == float("-inf")
    lse = torch.stack([torch.where(empty, torch.full_like(M, float("inf")), M), L2])
    return O.to(q.dtype), lse


@ring_attention_fwd.register_fake
def _(q, k, v, group, zigzag, scale, left, right, softcap, backend):
    B, Hq, Tl, D = q.shape
    return q.new_empty((B, Hq, Tl, D)), q.new_empty((2, B, Hq, Tl), dtype=_checks.acc_dtype(q.dtype))


@torch.library.custom_op("rlhf_ops::ring_attention_bwd", mutates_args=())
def ring_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       group: str, zigzag: bool, scale: float, left: int, right: int, softcap: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """→ (dq, dk, dv) of this rank's q, k, v. K/V travel the ring again; each block's dK/dV
    accumulate (acc dtype) in a buffer that follows its block and reaches the owner after W hops."""
    pg = _group(group)
    W, r = _world(pg)
    Tl = q.shape[2]
    acc = _checks.acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv_in = None                 # the travelling dK/dV of the block this rank holds next
    for step in range(W):
        j = (r - step) % W
        nxt = _RingPass(kv, pg) if step < W - 1 else None
        dkv = torch.zeros((2,) + tuple(k.shape), dtype=acc, device=k.device)
        for q0, t, k0, s, lft, rgt in _pairs(W, r, j, Tl, zigzag, left, right):
            rows, keys = slice(q0, q0 + t), slice(k0, k0 + s)
            dq_b, dk_b, dv_b = _block_bwd(backend, dout[:, :, rows], q[:, :, rows],
                                          kv[0][:, :, keys], kv[1][:, :, keys], out[:, :, rows],
                                          lse[:, :, :, rows], scale, lft, rgt, softcap)
            dq[:, :, rows] += dq_b
            dkv[0][:, :, keys] += dk_b
            dkv[1][:, :, keys] += dv_b
        if dkv_in is not None:
            dkv += dkv_in.wait()
        if W > 1:
            dkv_in = _RingPass(dkv, pg)   # on to the next rank; ours arrives from the previous
        if nxt is not None:
            kv = nxt.wait()
    if W > 1:
        dkv = dkv_in.wait()               # after W hops: this rank's own block, complete
    return dq.to(q.dtype), dkv[0].to(k.dtype, copy=True), dkv[1].to(v.dtype, copy=True)


@ring_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, group, zigzag, scale, left, right, softcap, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _ring_setup(ctx, inputs, output):
    q, k, v, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _ring_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.rlhf_ops.ring_attention_bwd(dout.contiguous(), q, k, v, out, lse,
                                                       *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


ring_attention_fwd.register_autograd(_ring_backward, setup_context=_ring_setup)


def _common_args(op, q, k, v, causal, scale, window, softcap, backend, n_batch):
    """Validation shared by both context-parallel attentions → (scale, left, right, softcap, be)."""
    _checks.flag(op, "causal", causal)
    scale = _attn._scale_arg(op, scale, q.shape[-1])
    left, right = _attn._window_arg(op, window, causal)
    softcap = _attn._softcap_arg(op, softcap)
    be = _backend.resolve(op, backend, q.device)
    if be != "reference":
        _attn._check_backend_support(op, be, q, n_batch, window, causal, softcap)
    return scale, left, right, softcap, be


def cp_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale=None, window=None,
                 softcap: float = 0.0, backend=None, cp_group=None, cp_layout: str = "zigzag") -> Tensor:
    """``rlhf_ops.attention`` with ``cp_group``: ring attention over this rank's part (layout
    ``cp_layout``) of a self-attention sequence (global T = S). See the module docstring."""
    op = _attn.OP
    _checks.choice(op, "cp_layout", cp_layout, LAYOUTS)
    if cp_group is None:
        raise ValueError(f"rlhf_ops.{op}: cp_layout={cp_layout!r} needs cp_group (the process group "
                         f"the sequence is split over)")
    with together(op, cp_group, q.device if isinstance(q, Tensor) else torch.device("cpu")) as cfg:
        _attn._validate_qkv(op, q, k, v, "BHTD")
        W, _ = _world(cp_group)
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"rlhf_ops.{op}: with cp_group, q and k/v must hold the same part of "
                             f"one sequence (self-attention), got q.shape[2] = {q.shape[2]} and "
                             f"k.shape[2] = {k.shape[2]}")
        zig = cp_layout == "zigzag"
        if zig and q.shape[2] % 2:
            raise ValueError(f"rlhf_ops.{op}: with cp_layout='zigzag' each rank holds 2 equal "
                             f"chunks: q.shape[2] must be even, got {q.shape[2]}")
        scale, left, right, softcap, be = _common_args(op, q, k, v, causal, scale, window, softcap,
                                                       backend, q.shape[0])
        cfg[0] = (f"q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype} causal={causal} "
                  f"scale={scale} window={window} softcap={softcap} backend={be} layout={cp_layout}")
    out, _ = torch.ops.rlhf_ops.ring_attention_fwd(q, k, v, cp_group.group_name, zig, scale, left,
                                                   right, softcap, be)
    return out


# -------------------------------------------------------------- varlen: gathered K/V ---

def _varlen_pieces(cu_local: Tensor, W: int, r: int, n_local: int, causal: bool):
    """The call on gathered K/V: (cu_q', cu_k', key positions in the gathered buffer, Nk').

    causal: every local chunk (chunk r, then chunk 2W−1−r of each sequence) is a query
    "sequence" against the prefix of its sequence's keys that ends where the chunk ends — keys
    (r + 1)·c_b and (2W − r)·c_b long, Σ = (2W + 1)·n_local/2 keys; bottom-right alignment
    then places every query at its global position. Not causal: each local sequence against its
    whole global sequence (W·n_local keys, in order)."""
    cu = cu_local.long()
    n = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    c = lens // 2
    if causal:
        mid = cu[:-1] + c
        cu_q = torch.cat([torch.stack([cu[:-1], mid], 1).reshape(-1), cu[-1:]])
        klen = torch.stack([(r + 1) * c, (2 * W - r) * c], 1).reshape(-1)
        seq_of_piece = torch.arange(n, device=cu.device).repeat_interleave(2)
        nk = (2 * W + 1) * n_local // 2
    else:
        cu_q = cu
        klen = W * lens
        seq_of_piece = torch.arange(n, device=cu.device)
        nk = W * n_local
    cu_k = torch.cat([klen.new_zeros(1), klen.cumsum(0)])
    piece = torch.repeat_interleave(torch.arange(klen.numel(), device=cu.device), klen,
                                    output_size=nk)
    g = torch.arange(nk, device=cu.device) - cu_k[piece]         # position in its sequence
    pos = _holder_positions(g, seq_of_piece[piece], cu_local, W, n_local)
    return cu_q.to(torch.int32), cu_k.to(torch.int32), pos, nk


def _eager_varlen(q, k, cu_q, cu_k, max_q, max_k, left, right):
    """Block views of the eager varlen path: (q blocks [n, Hq, max_q, D] index, kv index, visible)."""
    cu_q, cu_k = cu_q.long(), cu_k.long()
    T = (cu_q[1:] - cu_q[:-1])[:, None, None]
    S = (cu_k[1:] - cu_k[:-1])[:, None, None]
    i = torch.arange(max_q, device=q.device)[None, :, None]
    j = torch.arange(max_k, device=q.device)[None, None, :]
    vis = (i < T) & (j < S) & reference._visible(i, j, T, S, left, right)
    # a row past its sequence's end reads (and writes back into) the extra zero row at index N
    qi = torch.where(i[..., 0] < T[..., 0], cu_q[:-1, None] + i[..., 0], q.shape[0])
    ki = torch.where(j[:, 0] < S[..., 0], cu_k[:-1, None] + j[:, 0], k.shape[0])
    return qi, ki, vis[:, None]


def _blocks(x, idx):                       # [N, H, D] → [n, H, L, D]; index N reads a zero row
    x = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])
    return x[idx].transpose(1, 2)


def _unblocks(xb, idx, N):                 # inverse of _blocks, summing repeated rows: [N, H, D]
    xb = xb.transpose(1, 2)
    out = xb.new_zeros((N + 1,) + tuple(xb.shape[2:]))
    out.index_add_(0, idx.reshape(-1), xb.reshape((-1,) + tuple(xb.shape[2:])))
    return out[:N]


def _varlen_fwd_any(be, q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap):
    """(out [Nq, Hq, D], lse [2, Hq, Nq]) as ``rlhf_ops::attention_varlen_fwd``; the reference
    backend runs the eager block math on [n, max_q, max_k] blocks."""
    if be == "reference":
        qi, ki, vis = _eager_varlen(q, k, cu_q, cu_k, max_q, max_k, left, right)
        o, lse = _eager_fwd(_blocks(q, qi), _blocks(k, ki), _blocks(v, ki), vis, scale, softcap)
        N = q.shape[0]
        return (_unblocks(o, qi, N).contiguous(),
                _unblocks(lse.permute(1, 2, 3, 0), qi, N).permute(2, 1, 0).contiguous())
    causal = right == 0 and left == -1
    return torch.ops.rlhf_ops.attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                   left, right, softcap, be)


def _varlen_bwd_any(be, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right,
                    softcap):
    if be == "reference":
        qi, ki, vis = _eager_varlen(q, k, cu_q, cu_k, max_q, max_k, left, right)
        lse_b = _blocks(lse.permute(2, 1, 0), qi).permute(3, 0, 1, 2)     # [2, n, Hq, max_q]
        dq, dk, dv = _eager_bwd(_blocks(dout, qi), _blocks(q, qi), _blocks(k, ki), _blocks(v, ki),
                                _blocks(out, qi), lse_b, vis, scale, softcap)
        return (_unblocks(dq, qi, q.shape[0]), _unblocks(dk, ki, k.shape[0]),
                _unblocks(dv, ki, k.shape[0]))
    causal = right == 0 and left == -1
    return torch.ops.rlhf_ops.attention_varlen_bwd(dout, q, k, v, out, lse.contiguous(), cu_q, cu_k,
                                                   max_q, max_k, causal, scale, left, right,
                                                   softcap, be)


def _varlen_maxes(max_seqlen: int, W: int, r: int, causal: bool) -> tuple[int, int]:
    """max_seqlen of the pieces: a query chunk is at most max/2 long, its key prefix
    (2W − r)·max/2 (causal); not causal: the local sequence against the global one."""
    if causal:
        return max_seqlen // 2, (2 * W - r) * (max_seqlen // 2)
    return max_seqlen, W * max_seqlen


def _gathered_pieces(k, v, cu, max_seqlen, pg, causal):
    W, r = _world(pg)
    n_local = k.shape[0]
    cu_q, cu_k, pos, _ = _varlen_pieces(cu, W, r, n_local, causal)
    kv = _all_gather(torch.stack([k, v]), pg)                   # [W, 2, n_local, Hkv, D]
    kv = kv.transpose(0, 1).reshape((2, W * n_local) + tuple(k.shape[1:]))
    max_q, max_k = _varlen_maxes(max_seqlen, W, r, causal)
    return kv[0][pos], kv[1][pos], cu_q, cu_k, pos, max_q, max_k


@torch.library.custom_op("rlhf_ops::cp_attention_varlen_fwd", mutates_args=())
def cp_attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                            group: str, causal: bool, scale: float, left: int, right: int,
                            softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    """This rank's zigzag parts of packed sequences (local cu_seqlens, the same on every rank) →
    (out [Nq, Hq, D], global lse [2, Hq, Nq]). K/V are all-gathered, then one varlen call."""
    pg = _group(group)
    kp, vp, cu_q, cu_k, _, max_q, max_k = _gathered_pieces(k, v, cu_seqlens, max_seqlen, pg, causal)
    lft = -1 if left >= max_k else left
    return _varlen_fwd_any(backend, q, kp, vp, cu_q, cu_k, max_q, max_k, scale, lft, right, softcap)


@cp_attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, group, causal, scale, left, right, softcap, backend):
    Nq, Hq, D = q.shape
    return q.new_empty((Nq, Hq, D)), q.new_empty((2, Hq, Nq), dtype=_checks.acc_dtype(q.dtype))


@torch.library.custom_op("rlhf_ops::cp_attention_varlen_bwd", mutates_args=())
def cp_attention_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                            cu_seqlens: Tensor, max_seqlen: int, group: str, causal: bool,
                            scale: float, left: int, right: int, softcap: float,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """→ (dq, dk, dv): K/V gathered again, the varlen backward on the pieces, the keys' gradients
    summed into the gathered layout and reduce-scattered (acc dtype) back to their owners."""
    pg = _group(group)
    W, _ = _world(pg)
    kp, vp, cu_q, cu_k, pos, max_q, max_k = _gathered_pieces(k, v, cu_seqlens, max_seqlen, pg, causal)
    lft = -1 if left >= max_k else left
    dq, dkp, dvp = _varlen_bwd_any(backend, dout, q, kp, vp, out, lse, cu_q, cu_k, max_q, max_k,
                                   scale, lft, right, softcap)
    acc = _checks.acc_dtype(k.dtype)
    n_local = k.shape[0]
    dkv = torch.zeros((2, W * n_local) + tuple(k.shape[1:]), dtype=acc, device=k.device)
    dkv[0].index_add_(0, pos, dkp.to(acc))
    dkv[1].index_add_(0, pos, dvp.to(acc))
    mine = _reduce_scatter(dkv.view((2, W, n_local) + tuple(k.shape[1:])).transpose(0, 1), pg)
    return dq, mine[0].to(k.dtype, copy=True), mine[1].to(v.dtype, copy=True)


@cp_attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, group, causal, scale, left, right, softcap,
      backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = torch.ops.rlhf_ops.cp_attention_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu,
                                                            *ctx.args)
    return (dq, dk, dv, None) + (None,) * len(ctx.args)


cp_attention_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def cp_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                        max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True, scale=None,
                        window=None, softcap: float = 0.0, backend=None, cp_group=None) -> Tensor:
    """``rlhf_ops.attention_varlen`` with ``cp_group``: q/k/v hold this rank's zigzag part of every
    packed sequence (self-attention); cu_seqlens/max_seqlen are the local ones (the same on every
    rank). See the module docstring for the gathered-K/V algorithm and its memory."""
    op = _attn.OP_VARLEN
    dev = q.device if isinstance(q, Tensor) else torch.device("cpu")
    with together(op, cp_group, dev) as cfg:
        _attn._validate_qkv(op, q, k, v, "NHD")
        _attn._check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k)
        if k.shape[0] != q.shape[0] or max_seqlen_k != max_seqlen_q:
            raise ValueError(f"rlhf_ops.{op}: with cp_group, q and k/v hold the same tokens "
                             f"(self-attention): k.shape[0] ({k.shape[0]}) and max_seqlen_k "
                             f"({max_seqlen_k}) must equal q.shape[0] ({q.shape[0]}) and "
                             f"max_seqlen_q ({max_seqlen_q})")
        if window is not None and not causal and tuple(window) != (-1, -1):
            raise ValueError(f"rlhf_ops.{op}: with cp_group, window needs causal=True (a window of "
                             f"a non-causal sequence split over ranks is not supported), got "
                             f"window={tuple(window)} with causal=False")
        scale, left, right, softcap, be = _common_args(op, q, k, v, causal, scale, window, softcap,
                                                       backend, 2 * (cu_seqlens_q.shape[0] - 1))
        crc = ""
        if _backend.debug_checks(q.device) and q.device.type != "meta" and not torch.compiler.is_compiling():
            cq, ck = cu_seqlens_q.cpu().long(), cu_seqlens_k.cpu().long()
            if not torch.equal(cq, ck):
                raise ValueError(f"rlhf_ops.{op}: with cp_group, cu_seqlens_k must equal "
                                 f"cu_seqlens_q (self-attention)")
            lens = cq[1:] - cq[:-1]
            if bool((lens % 2 != 0).any()):
                raise ValueError(f"rlhf_ops.{op}: with cp_group, every local sequence length (in "
                                 f"cu_seqlens_q) must be even — its two zigzag chunks — got "
                                 f"lengths {lens.tolist()}")
            crc = f" cu_seqlens crc {zlib.crc32(cq.numpy().tobytes())}"
        cfg[0] = (f"q {tuple(q.shape)} k {tuple(k.shape)} {q.dtype} max_seqlen={max_seqlen_q} "
                  f"causal={causal} scale={scale} window={window} softcap={softcap} backend={be}"
                  + crc)
    out, _ = torch.ops.rlhf_ops.cp_attention_varlen_fwd(q, k, v, cu_seqlens_q, int(max_seqlen_q),
                                                        cp_group.group_name, bool(causal), scale,
                                                        left, right, softcap, be)
    return out


# ------------------------------------------------------------------------------- Ulysses ---

@torch.library.custom_op("rlhf_ops::cp_all_to_all", mutates_args=())
def cp_all_to_all(x: Tensor, group: str, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split ``x`` into W equal parts along ``scatter_dim``, send part i to rank i, and concatenate
    what every rank sent (in rank order) along ``gather_dim``. Its backward is the same with the
    two dims swapped."""
    pg = _group(group)
    W, _ = _world(pg)
    # [..., n, ...] → [W, ..., n/W, ...]: part i leads, contiguous for the collective
    parts = x.unflatten(scatter_dim, (W, x.shape[scatter_dim] // W)).movedim(scatter_dim, 0)
    recv = _all_to_all(parts, pg)                              # row i: rank i's part for us
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


@cp_all_to_all.register_fake
def _(x, group, scatter_dim, gather_dim):
    W = _dist().get_world_size(_group(group))
    shape = list(x.shape)
    shape[scatter_dim] //= W
    shape[gather_dim] *= W
    return x.new_empty(shape)


def _a2a_setup(ctx, inputs, output):
    _, ctx.group, ctx.scatter_dim, ctx.gather_dim = inputs


def _a2a_backward(ctx, grad):
    g = torch.ops.rlhf_ops.cp_all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim)
    return g, None, None, None


cp_all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


def _describe(kw: dict) -> str:
    return ", ".join(f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v!r}"
                     for k, v in sorted(kw.items()))


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group, *, attn=_attn.attention, **kwargs):
    """Ulysses sequence parallelism: q/k/v hold a contiguous, equal slice of the sequence with all
    heads — [B, H, T/W, D] (dense) or [N/W, H, D] (packed) — and ``attn`` runs on the whole
    sequence with H/W heads of each (``**kwargs``, e.g. causal, window, softcap, or the global
    cu_seqlens_q/_k and max_seqlen_q/_k of ``attention_varlen``, pass through). Query heads must
    divide by W; KV heads must divide by W (GQA) or divide W (1 = MQA: repeated to W heads).
    Differentiable (the backward of an all-to-all is the inverse all-to-all)."""
    op = "ulysses_attention"
    dev = q.device if isinstance(q, Tensor) else torch.device("cpu")
    with together(op, group, dev, "group") as cfg:
        if not callable(attn):
            raise TypeError(f"rlhf_ops.{op}: attn must be an attention function (rlhf_ops.attention "
                            f"or attention_varlen), got {type(attn).__name__}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            _checks.floating(op, name, t)
            if t.dim() not in (3, 4) or t.dim() != q.dim():
                raise ValueError(f"rlhf_ops.{op}: q, k, v must all be [B, H, T, D] (dense) or all "
                                 f"[N, H, D] (packed), got {name} of shape {tuple(t.shape)}")
        W, _ = _world(group)
        seq = 2 if q.dim() == 4 else 0
        Hq, Hkv = q.shape[1], k.shape[1]
        if Hq % W:
            raise ValueError(f"rlhf_ops.{op}: the query heads (q.shape[1] = {Hq}) must divide by "
                             f"the group size W = {W}")
        if Hkv == 0 or (Hkv % W and W % Hkv):
            raise ValueError(f"rlhf_ops.{op}: the key/value heads (k.shape[1] = {Hkv}) must divide "
                             f"by the group size W = {W} (each rank takes Hkv/W of them) or divide "
                             f"W (1: MQA, repeated to every rank)")
        if k.shape[seq] != q.shape[seq]:
            raise ValueError(f"rlhf_ops.{op}: q and k/v must hold the same slice of the sequence, "
                             f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
        cfg[0] = (f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} {q.dtype} "
                  f"attn={getattr(attn, '__name__', attn)} {_describe(kwargs)}")
    gname = group.group_name
    if Hkv % W:                                 # W = Hkv·rep: every rank takes one kv head
        k, v = k.repeat_interleave(W // Hkv, dim=1), v.repeat_interleave(W // Hkv, dim=1)

    def heads_out(x):                           # [seq slice, all heads] → [all seq, H/W heads]
        return torch.ops.rlhf_ops.cp_all_to_all(x.contiguous(), gname, 1, seq)
    out = attn(heads_out(q), heads_out(k), heads_out(v), **kwargs)
    return torch.ops.rlhf_ops.cp_all_to_all(out.contiguous(), gname, seq, 1)


# -------------------------------------------------------------------- FSDP2 weights ---

def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor, Shard


def _is_dtensor(x) -> bool:
    t = _dtensor_types()
    return t is not None and isinstance(x, t[0])


def _shard_sizes(V: int, W: int) -> list[int]:
    """Rows per rank of a Shard(0) DTensor (torch.chunk's rule: ⌈V/W⌉ each, the rest on the last
    ones, possibly none)."""
    ch = -(-V // W) if W else 0
    return [max(0, min(ch, V - i * ch)) for i in range(W)]


class _GatherFSDP(torch.autograd.Function):
    """Forward: the whole [V, ...] weight from every rank's Shard(0) rows (one all_gather).
    Backward: each rank's full gradient is reduce-scattered and divided by W — FSDP2's mean over
    the data-parallel group — and returned as a Shard(0) DTensor like the parameter."""

    @staticmethod
    def forward(ctx, w):
        local = w.to_local()
        mesh = w.device_mesh
        pg = mesh.get_group()
        W, r = _world(pg)
        sizes = _shard_sizes(w.shape[0], W)
        ctx.mesh, ctx.shape, ctx.stride, ctx.sizes, ctx.pg, ctx.r = (mesh, w.shape, w.stride(), sizes,
                                                                     pg, r)
        ch = max(sizes)
        pad = local.new_zeros((ch,) + tuple(local.shape[1:]))
        pad[:local.shape[0]] = local
        parts = _all_gather(pad, pg)                                # [W, ch, ...]
        return torch.cat([parts[i, :n] for i, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad):
        DTensor, Shard = _dtensor_types()
        sizes, W = ctx.sizes, len(ctx.sizes)
        ch = max(sizes)
        pad = grad.new_zeros((W, ch) + tuple(grad.shape[1:]))
        for i, piece in enumerate(grad.split(sizes)):
            pad[i, :sizes[i]] = piece
        mine = _reduce_scatter(pad, ctx.pg)[:sizes[ctx.r]] / W
        return DTensor.from_local(mine, ctx.mesh, [Shard(0)], run_check=False, shape=ctx.shape,
                                  stride=ctx.stride)


def _agree_replicated(op: str, hidden, group) -> None:
    """weight_shard="vocab" with a Shard(0) DTensor weight: a vocabulary shard needs the same
    hidden states on every rank. Where checks run (CPU tensors, RLHF_OPS_DEBUG=1) the ranks
    all-gather a checksum of their hidden; if they differ, the weight is more likely FSDP2's
    data-parallel shard — every rank raises asking for weight_shard instead of guessing."""
    local = hidden.to_local() if _is_dtensor(hidden) else hidden
    ok = isinstance(local, Tensor)
    device = local.device if ok else torch.device("cpu")
    if device.type == "meta" or not _backend.debug_checks(device) or torch.compiler.is_compiling():
        return
    crc = 0
    if ok:
        raw = local.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
        crc = zlib.crc32(raw, zlib.crc32(str(tuple(local.shape)).encode()))
    row = torch.tensor([int(ok), crc], dtype=torch.int64, device=device)
    rows = _all_gather(row, group, count=False).tolist()
    if not all(r[0] for r in rows):
        return                          # the op's own check names the bad argument on that rank
    if any(r[1] != rows[0][1] for r in rows):
        raise ValueError(f"rlhf_ops.{op}: weight is a Shard(0) DTensor read as a vocabulary shard "
                         f"(weight_shard='vocab', the default: every rank the same hidden rows), but "
                         f"the ranks hold different hidden states; if weight is FSDP2's data-parallel "
                         f"shard (fully_shard), pass weight_shard='fsdp'")


def head_weights(op: str, hidden, weight, bias, weight_shard, process_group):
    """(weight, bias) for the fused LM-head ops (``linear_cross_entropy``,
    ``linear_token_logprobs``) by ``weight_shard``: "fsdp" gathers FSDP2's Shard(0) DTensors
    (``fsdp_gather``; process_group must be None); "vocab" leaves them to the vocabulary-parallel
    path, after checking, for a DTensor weight, that the ranks' hidden states agree
    (``_agree_replicated``)."""
    _checks.choice(op, "weight_shard", weight_shard, WEIGHT_SHARDS)
    if weight_shard == "vocab":
        if _is_dtensor(weight) and process_group is None and weight.device_mesh.ndim == 1:
            _agree_replicated(op, hidden, weight.device_mesh.get_group())
        return weight, bias
    if process_group is not None:
        raise ValueError(f"rlhf_ops.{op}: weight_shard='fsdp' reads the data-parallel group from the "
                         f"weight (a Shard(0) DTensor of fully_shard); process_group is for "
                         f"vocabulary shards (weight_shard='vocab'): pass one or the other")
    return fsdp_gather(op, "weight", weight), fsdp_gather(op, "bias", bias)


def fsdp_gather(op: str, name: str, t):
    """weight_shard="fsdp": FSDP2's Shard(0) DTensor ``t`` (weight [V, d] or bias [V]) on a 1-D
    mesh → the whole tensor, differentiable as ``_GatherFSDP``. A plain tensor (a parameter that
    fully_shard has unsharded for the forward) is returned as it is; None stays None."""
    if t is None or not _is_dtensor(t):
        return t
    _, Shard = _dtensor_types()
    mesh = t.device_mesh
    if mesh.ndim != 1 or not (len(t.placements) == 1 and isinstance(t.placements[0], Shard)
                              and t.placements[0].dim % t.ndim == 0):
        raise ValueError(f"rlhf_ops.{op}: with weight_shard='fsdp', {name} must be a DTensor "
                         f"sharded Shard(0) on a 1-D device mesh (fully_shard's parameter), got "
                         f"placements {tuple(t.placements)} on a {mesh.ndim}-D mesh")
    return _GatherFSDP.apply(t)


def fully_sharded(module) -> bool:
    """Whether ``module`` or a submodule is wrapped by FSDP2's ``fully_shard`` (so its LM-head
    weight, read outside the module's forward, is a Shard(0) DTensor over the data-parallel
    group: pass weight_shard="fsdp")."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())
