"""Context parallelism for the chosen layer: the head-mean divergence with the sequence split over ranks.

Ulysses-style sequence parallelism splits *heads* across ranks inside attention, but the head-mean
policy couples every head of a row, so no rank could compute a row's divergence alone. Rows are
independent, though: a rank that holds some query rows with **all** heads, and **all** keys, computes
their output, divergence and statistics exactly. So here queries (and q_ref, row_mask, ref_stats)
stay split by sequence position, keys, values, k_ref and the key padding mask are all-gathered over
the group, each rank runs the op on its own rows through a sequence table (one work unit per local
chunk, its rows placed at the chunk's key positions), and the backward reduce-scatters dK / dV.

Layouts of a sequence of S positions over P ranks:
- "zigzag" (default): 2P near-equal chunks; rank r holds chunks r and 2P-1-r, so under causal
  masking every rank gets one early (cheap) and one late (expensive) chunk;
- "contiguous": P near-equal chunks; rank r holds chunk r (the last rank does most causal work).
Chunk sizes differ by at most one position; S need not be divisible by 2P.

Memory per rank: O(S/P · H · D) for its queries, outputs and their gradients, plus O(S · Hkv · D)
for the gathered keys / values (1.5 S · Hkv · D with the causal zigzag halves, see "Overlap") and
k_ref (S · Hrkv · Dr), plus the op's O(B · H · S/P) row statistics. Nothing grows as S × S or
(S/P) × S.

Overlap: the reference's keys are known before the forward starts, so ``prefetch_keys`` all-gathers
them asynchronously ahead of the chosen layer (and a caller holding the whole stream's reference
passes it as ``GatheredKeys(whole)``, with no collective). The policy's own keys and values exist only
at the chosen layer. Under causal masking in the zigzag layout they are gathered in two all-gathers,
the sequence's first half then its second, both started at once: rank r's first chunk lies in the
first half and attends nothing after it, so its rows run (one op call) while the second half is in
flight, and the rows of its late chunk run once it has arrived (a second op call on the whole
sequence). That costs the first half's keys and values held a second time (the late call's keys are
one concatenated tensor). Without causal masking, or in the contiguous layout, every row may need
every rank's keys, so they are gathered in one all-gather before the op; overlapping that would need
the op split into a statistics sweep per arriving key chunk and a second sweep, which the kernels do
not offer.

The result equals ``ral.ops.attention_kl`` on the whole sequence in one process (values and
gradients), which tests/test_distributed.py checks on 2 and 4 gloo processes.
"""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .checks import check_choice, check_int
from .reference import AttentionKL

__all__ = ["attention_kl_cp", "attention_kl_cp_varlen", "shard", "unshard", "prefetch_keys", "GatheredKeys", "chunks",
           "causal_work", "LAYOUTS"]

LAYOUTS = ("zigzag", "contiguous")


def chunks(seq_len: int, world: int, layout: str = "zigzag") -> List[List[Tuple[int, int]]]:
    """Per rank, its chunks as (start, length) in sequence order of the rank's local tensor.

    "zigzag": 2P chunks, rank r holds chunk r then chunk 2P-1-r; "contiguous": P chunks."""
    check_choice("layout", layout, LAYOUTS)
    check_int("seq_len", seq_len, 0)
    check_int("world", world, 1)
    n = 2 * world if layout == "zigzag" else world
    sizes = [seq_len // n + (1 if j < seq_len % n else 0) for j in range(n)]
    starts = [sum(sizes[:j]) for j in range(n)]
    if layout == "contiguous":
        return [[(starts[r], sizes[r])] for r in range(world)]
    return [[(starts[r], sizes[r]), (starts[n - 1 - r], sizes[n - 1 - r])] for r in range(world)]


def causal_work(seq_len: int, world: int, layout: str = "zigzag", block: int = 64) -> List[int]:
    """Causal attention tiles (block x block query/key tiles with at least one attended pair) per rank."""
    work = []
    for rank_chunks in chunks(seq_len, world, layout):
        tiles = 0
        for start, length in rank_chunks:
            for row0 in range(start, start + length, block):
                last_row = min(row0 + block, start + length) - 1
                tiles += last_row // block + 1          # key blocks 0 .. the one holding the last row
        work.append(tiles)
    return work


def _positions(rank_chunks) -> int:
    """How many positions a list of (start, length) chunks holds."""
    return sum(length for _, length in rank_chunks)


def _rank_world(group) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: Tensor, dim: int, group=None, layout: str = "zigzag") -> Tensor:
    """This rank's shard of a whole-sequence tensor along `dim` (its chunks, concatenated)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: {dim!r} is not a dimension of a {x.dim()}-D tensor")
    rank, world = _rank_world(group)
    return _take(x, dim, chunks(x.shape[dim], world, layout)[rank])


def unshard(x: Tensor, dim: int, seq_len: int, group=None, layout: str = "zigzag") -> Tensor:
    """The whole-sequence tensor from every rank's shard along `dim` (all-gather; differentiable:
    the gradient of each position goes back to the rank that holds it, summed over ranks). ValueError
    when x does not hold this rank's number of positions of a sequence of seq_len."""
    _, layout_chunks = _check_shards(group, seq_len, layout, [("x", x, dim)])
    return _Gather.apply(x, _Pending(x, dim, layout_chunks, group))[0]


class _Pending:
    """An all-gather, started asynchronously, of every rank's positions of a sequence: rank r passes
    its positions ``layout_chunks[r]`` (concatenated along `dim`) and ``wait()`` gives every rank's
    chunks in position order (one tensor covering their union, which must be contiguous), written into
    ``buffer()`` if that was asked for first."""

    def __init__(self, x: Tensor, dim: int, layout_chunks, group):
        longest = max(_positions(c) for c in layout_chunks)
        padded = _pad_to(x.detach().contiguous(), dim, longest)
        self.parts = [torch.empty_like(padded) for _ in layout_chunks]
        self.work = dist.all_gather(self.parts, padded, group=group, async_op=True)
        self.dim, self.chunks, self.group, self._whole, self._buffer = dim, layout_chunks, group, None, None

    def buffer(self) -> Tensor:
        """The tensor ``wait()`` will fill, allocated now (uninitialised until then)."""
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(_positions(c) for c in self.chunks)
        self._buffer = self.parts[0].new_empty(shape)
        return self._buffer

    def wait(self) -> Tensor:
        if self._whole is None:
            self.work.wait()
            with torch.no_grad():
                self._whole = _assemble(self.parts, self.dim, self.chunks, out=self._buffer)
            self.parts = None
        return self._whole


def _assemble(parts: List[Tensor], dim: int, layout_chunks, out: Optional[Tensor] = None) -> Tensor:
    """The positions of every rank's chunks, in natural order, from the gathered (padded) shards
    (written into `out` when given)."""
    pieces = []
    for part, rank_chunks in zip(parts, layout_chunks):
        offset = 0
        for start, length in rank_chunks:
            pieces.append((start, part.narrow(dim, offset, length)))
            offset += length
    ordered = [piece for _, piece in sorted(pieces, key=lambda item: item[0])]
    return torch.cat(ordered, dim=dim) if out is None else torch.cat(ordered, dim=dim, out=out)


class GatheredKeys:
    """A whole sequence of reference keys for the ``k_ref`` argument of ``attention_kl_cp`` /
    ``attention_kl_cp_varlen``, in place of this rank's shard, so that the op does not all-gather it
    at the chosen layer: ``prefetch_keys`` starts that all-gather early and asynchronously (NCCL runs
    it on its own stream, gloo on its worker thread) so that it overlaps whatever the rank computes
    before the chosen layer (the reference's keys are known before the forward starts), and
    ``GatheredKeys(whole)`` wraps a tensor that already holds every position (a reference recorded for
    the whole stream), which needs no collective at all. Every rank of the group must pass the same
    kind of k_ref (shards, or GatheredKeys). No gradient flows through it (k_ref never gets one).

    whole: the whole sequence, (B, Hrkv, S, Dr) for attention_kl_cp or (T, Hrkv, Dr) for the varlen op.
    """

    def __init__(self, whole: Optional[Tensor] = None):
        if whole is not None and not isinstance(whole, Tensor):
            raise TypeError(f"whole: expected a Tensor, got {type(whole).__name__}")
        self._whole = None if whole is None else whole.detach()
        self._pending: Optional[_Pending] = None  # a prefetch's all-gather, not waited for yet

    def wait(self) -> Tensor:
        """The whole sequence (waits for the prefetch's all-gather the first time)."""
        if self._pending is not None:
            self._whole, self._pending = self._pending.wait(), None
        return self._whole


def prefetch_keys(x: Tensor, dim: int, seq_len: int, group=None, layout: str = "zigzag") -> GatheredKeys:
    """Starts the all-gather of this rank's shard `x` (positions along `dim`, as ``shard`` gives them) of
    a sequence of `seq_len` positions and returns it as ``GatheredKeys`` for the ``k_ref`` of
    ``attention_kl_cp`` (dim 2) or ``attention_kl_cp_varlen`` (dim 0), which waits for it. A
    collective: every rank of `group` calls it, in the same order as its other collectives there."""
    _require_group("prefetch_keys")
    _check_shards(group, seq_len, layout, (("x", x, dim),))
    keys = GatheredKeys()
    keys._pending = _Pending(x, dim, chunks(seq_len, _rank_world(group)[1], layout), group)
    return keys


class _Gather(torch.autograd.Function):
    """The positions that started all-gathers of x bring, in natural order: one ``_Pending`` per part
    of x (consecutive slices of x along the same dim, in order). Part 0 is waited for here; later parts
    come back as their buffers, which the caller fills with ``pending.wait()`` when it needs them (so
    that work on part 0 overlaps their transfer). Backward: each part's gradient reduce-scattered,
    one after the other, each rank keeping its own positions (x's), once every part's gradient is
    complete (one reduction point, so ranks whose work per part differs do not wait on each other
    halfway)."""

    @staticmethod
    def forward(ctx, x, *pendings):
        ctx.dim, ctx.group = pendings[0].dim, pendings[0].group
        ctx.parts = [pending.chunks for pending in pendings]
        ctx.rank = _rank_world(ctx.group)[0]
        return (pendings[0].wait(),) + tuple(pending.buffer() for pending in pendings[1:])

    @staticmethod
    def backward(ctx, *grads):
        mine, nccl = [], dist.get_backend(ctx.group) == "nccl"
        for grad, part in zip(grads, ctx.parts):
            grad = grad.contiguous()
            if nccl:   # reduce-scatter each rank's positions
                longest = max(_positions(c) for c in part)
                inputs = [_pad_to(_take(grad, ctx.dim, c), ctx.dim, longest) for c in part]
                out = torch.empty_like(inputs[ctx.rank])
                dist.reduce_scatter(out, inputs, group=ctx.group)
                mine.append(out.narrow(ctx.dim, 0, _positions(part[ctx.rank])))
            else:  # gloo has no reduce-scatter: sum the whole gradient, keep this rank's positions
                dist.all_reduce(grad, group=ctx.group)
                mine.append(_take(grad, ctx.dim, part[ctx.rank]))
        return (mine[0] if len(mine) == 1 else torch.cat(mine, ctx.dim),) + (None,) * len(ctx.parts)


def _take(x: Tensor, dim: int, rank_chunks) -> Tensor:
    """The positions of `rank_chunks` of a whole-sequence tensor, concatenated along `dim`."""
    return torch.cat([x.narrow(dim, start, length) for start, length in rank_chunks], dim=dim)


def _pad_to(x: Tensor, dim: int, length: int) -> Tensor:
    if x.shape[dim] == length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def attention_kl_cp(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_ref: Tensor, k_ref: Tensor,
                    seq_len: int, group=None, layout: str = "zigzag", ref_stats: Optional[Tensor] = None,
                    divergence: str = "jsd", heads: str = "mean", exclude_self: bool = True, causal: bool = True,
                    scale: Optional[float] = None, ref_scale: Optional[float] = None,
                    key_padding_mask: Optional[Tensor] = None, row_mask: Optional[Tensor] = None,
                    backend: str = "auto", key_segments: Optional[Tensor] = None,
                    num_segments: Optional[int] = None) -> AttentionKL:
    """``ral.ops.attention_kl`` on a sequence split over the ranks of `group` (self-attention: the
    query rows and the keys are the same S positions).

    Every tensor is this rank's shard in `layout` (see ``shard``), with all heads:
        q (B, H, S_r, D), k (B, Hkv, S_r, D), v (B, Hkv, S_r, Dv) or None, q_ref (B, Hr, S_r, Dr),
        k_ref (B, Hrkv, S_r, Dr), ref_stats (B, Hr, S_r, 2), key_padding_mask (B, S_r), row_mask (B, S_r),
        key_segments (B, S_r) with num_segments; k_ref may instead be a ``GatheredKeys`` of the whole
        (B, Hrkv, S, Dr) (``prefetch_keys``: gathered ahead, overlapping earlier compute);
    seq_len: S, the whole sequence's length. Other arguments as in ``attention_kl``.

    Returns this rank's rows: out (B, H, S_r, Dv), div (B, S_r) or (B, H, S_r), stats (B, H, S_r, 2),
    entropy like div and mass (B, S_r, S) | (B, H, S_r, S) with key_segments, equal to the matching
    rows of the single-process op on the whole sequence. Gradients reach the local q and, through the
    all-gather's backward (a reduce-scatter), the local k and v.
    """
    _require_group("attention_kl_cp")
    rank, layout_chunks = _check_shards(group, seq_len, layout, (
        ("q", q, 2), ("k", k, 2), ("q_ref", q_ref, 2), ("k_ref", _shard_or_none(k_ref), 2), ("v", v, 2),
        ("ref_stats", ref_stats, 2),
        ("key_padding_mask", key_padding_mask, 1), ("row_mask", row_mask, 1), ("key_segments", key_segments, 1)))
    pieces = _row_pieces(_key_parts(layout_chunks, seq_len, layout, causal), rank)
    keys = _KeysInFlight(k, v, k_ref, key_padding_mask, key_segments, 2, seq_len, group, layout, pieces)
    results = []
    for i, (_, piece_chunks, row0, rows, key_end) in enumerate(pieces):
        k_all, v_all, k_ref_all, kpm_all, segments_all = keys.upto(i)
        call = ops._checked_call(_rows(q, 2, row0, rows), k_all, v_all, _rows(q_ref, 2, row0, rows), k_ref_all,
                                 _rows(ref_stats, 2, row0, rows), divergence, heads, exclude_self, causal, scale,
                                 ref_scale, kpm_all, _rows(row_mask, 1, row0, rows), backend, segments_all,
                                 num_segments)
        seqs = _local_units(piece_chunks, q.shape[0], seq_len, causal, q.device)
        longest = max(length for _, length in piece_chunks)
        results.append(ops.run_table(call, seqs, longest, key_end, backend))
    row_dim = 1 if heads == "mean" else 2
    return _rows_joined(results, (2, row_dim, 2, row_dim, row_dim))


def attention_kl_cp_varlen(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, q_ref: Tensor, k_ref: Tensor,
                           cu_seqlens: Tensor, max_seqlen: int, group=None, layout: str = "zigzag",
                           ref_stats: Optional[Tensor] = None, divergence: str = "jsd", heads: str = "mean",
                           exclude_self: bool = True, causal: bool = True, scale: Optional[float] = None,
                           ref_scale: Optional[float] = None, row_mask: Optional[Tensor] = None,
                           backend: str = "auto", key_segments: Optional[Tensor] = None,
                           num_segments: Optional[int] = None) -> AttentionKL:
    """``ral.ops.attention_kl_varlen`` (self-attention: queries and keys are the same packed tokens)
    on a packed stream of T tokens split over the ranks of `group`.

    The stream is sharded as one sequence of T positions in `layout` (``shard(x, 0, group, layout)``),
    so a rank's chunk may hold the end of one packed sequence and the start of the next. Each rank
    passes its shard with all heads: q (T_r, H, D), k (T_r, Hkv, D), v (T_r, Hkv, Dv) or None,
    q_ref (T_r, Hr, Dr), k_ref (T_r, Hrkv, Dr), ref_stats (T_r, Hr, 2), row_mask (T_r,),
    key_segments (T_r,) (k_ref may instead be a ``GatheredKeys`` of the whole (T, Hrkv, Dr)); and the
    whole stream's cu_seqlens (N + 1,) int32 (the same on every rank) with max_seqlen, its longest
    sequence. Other arguments as in ``attention_kl_varlen``.

    Keys, values, k_ref and the segment ids are all-gathered; every (local chunk, packed sequence)
    overlap is one work unit whose rows sit at their positions inside their own sequence. Returns
    this rank's rows in the packed shapes of ``attention_kl_varlen``: out (T_r, H, Dv), div (T_r,) or
    (T_r, H), stats (T_r, H, 2), entropy / mass with key_segments; they equal the matching rows of the
    single-process op on the whole stream, and gradients reach the local q, k and v.
    """
    _require_group("attention_kl_cp_varlen")
    cu = _checked_cu_seqlens(cu_seqlens, max_seqlen, causal)
    total = cu[-1]
    rank, layout_chunks = _check_shards(group, total, layout, (
        ("q", q, 0), ("k", k, 0), ("q_ref", q_ref, 0), ("k_ref", _shard_or_none(k_ref), 0), ("v", v, 0),
        ("ref_stats", ref_stats, 0),
        ("row_mask", row_mask, 0), ("key_segments", key_segments, 0)))
    pieces = _row_pieces(_key_parts(layout_chunks, total, layout, causal), rank)
    keys = _KeysInFlight(k, v, k_ref, None, key_segments, 0, total, group, layout, pieces)
    results = []
    for i, (_, piece_chunks, row0, rows, _) in enumerate(pieces):
        k_all, v_all, k_ref_all, _, segments_all = keys.upto(i)
        mine_q, mine_q_ref, mine_ref_stats, mine_row_mask = (_rows(t, 0, row0, rows)
                                                             for t in (q, q_ref, ref_stats, row_mask))
        call = ops._checked_call(*(ops.packed_as_dense(t) for t in (mine_q, k_all, v_all, mine_q_ref, k_ref_all,
                                                                    mine_ref_stats)),
                                 divergence, heads, exclude_self, causal, scale, ref_scale, None,
                                 None if mine_row_mask is None else mine_row_mask.unsqueeze(0), backend,
                                 None if segments_all is None else segments_all.unsqueeze(0), num_segments)
        seqs, longest = _local_packed_units(piece_chunks, cu, causal, q.device)
        results.append(ops.dense_as_packed(ops.run_table(call, seqs, longest, int(max_seqlen), backend), heads))
    return _rows_joined(results, (0, 0, 0, 0, 0))


def _key_parts(layout_chunks, seq_len: int, layout: str, causal: bool):
    """How the policy's keys and values are all-gathered: a list of parts, each (its first position,
    one all-gather's chunks per rank relative to it), covering consecutive ranges of the sequence in
    order. One part, the whole sequence; or, under causal masking in the zigzag layout, two: the
    sequence's halves, gathered one after the other. Rank r's first chunk lies in the first half and
    attends nothing after it, so its rows run while the second half is still in flight."""
    world = len(layout_chunks)
    if not (layout == "zigzag" and causal and world > 1 and seq_len >= 2 * world):
        return [(0, layout_chunks)]
    halves = []
    for j in (0, 1):  # every rank's j-th chunk: chunks 0..P-1, then chunks P..2P-1
        first = min(rank_chunks[j][0] for rank_chunks in layout_chunks)
        halves.append((first, [[(rank_chunks[j][0] - first, rank_chunks[j][1])] for rank_chunks in layout_chunks]))
    return halves


class _Piece(NamedTuple):
    """This rank's rows of one key part: one op call."""

    part: list       # the part's all-gather chunks per rank (relative to its first position)
    chunks: list     # this rank's chunks of it, in sequence positions
    row0: int        # their first local row
    rows: int        # their row count
    key_end: int     # the part's end: the call attends keys 0 .. key_end (parts 0..i)


def _row_pieces(parts, rank: int) -> List[_Piece]:
    """One piece per key part (``_key_parts``), in order."""
    pieces, row0 = [], 0
    for first, part in parts:
        mine = [(first + start, length) for start, length in part[rank]]
        pieces.append(_Piece(part, mine, row0, _positions(mine), first + sum(_positions(c) for c in part)))
        row0 += _positions(mine)
    return pieces


def _rows(t: Optional[Tensor], dim: int, row0: int, rows: int) -> Optional[Tensor]:
    """Local rows row0 .. row0 + rows of a row-indexed tensor along dim (a view; None stays None)."""
    return None if t is None else t.narrow(dim, row0, rows)


def _rows_joined(results: List[AttentionKL], dims) -> AttentionKL:
    """The pieces' results as one: each field concatenated along its row dim (`dims`, in field order)."""
    if len(results) == 1:
        return results[0]
    return AttentionKL(*(None if fields[0] is None else torch.cat(fields, dim)
                         for fields, dim in zip(zip(*results), dims)))


class _KeysInFlight:
    """The keys the op needs, from every rank's shard: the policy's k and v all-gathered as `parts`
    says (differentiable: the backward reduce-scatters dK / dV), k_ref gathered whole (asynchronously,
    unless it came as ``GatheredKeys``), and the key padding mask and segment ids (small, gathered whole
    and at once). Every all-gather starts here, in the same order on every rank; ``upto(i)`` waits for
    parts 0..i (of ``_row_pieces``) and gives the positions they cover, from the sequence's start."""

    def __init__(self, k, v, k_ref, key_padding_mask, key_segments, dim: int, seq_len: int, group, layout: str,
                 pieces):
        mask_dim = max(dim - 1, 0)
        self.kpm = (None if key_padding_mask is None else
                    unshard(key_padding_mask.to(torch.uint8), mask_dim, seq_len, group, layout).to(torch.bool))
        self.segments = (None if key_segments is None
                         else unshard(key_segments.to(torch.int32), mask_dim, seq_len, group, layout))
        world = _rank_world(group)[1]
        if not isinstance(k_ref, GatheredKeys):  # this rank's shard: its all-gather starts first
            shard_of_k_ref, k_ref = k_ref, GatheredKeys()
            k_ref._pending = _Pending(shard_of_k_ref, dim, chunks(seq_len, world, layout), group)
        self.k_ref, self.dim, self.mask_dim, self.seq_len = k_ref, dim, mask_dim, seq_len
        self.pieces, self.pending = pieces, ([], [])
        for piece in pieces:
            for t, started in zip((k, v), self.pending):
                if t is not None:
                    started.append(_Pending(t.narrow(dim, piece.row0, piece.rows), dim, piece.part, group))
        # one autograd node per tensor for all its parts: part 0 waited for, the others still in flight
        self.gathered = [_Gather.apply(t, *started) if started else None for t, started in zip((k, v), self.pending)]

    def upto(self, i: int):
        """(k, v, k_ref, key padding mask, key segment ids) over positions 0 .. the end of part i."""
        for started in self.pending:
            for pending in started[1:i + 1]:
                pending.wait()  # fills the buffer _Gather returned for that part
        k_all, v_all = (None if gathered is None else gathered[0] if i == 0 else torch.cat(gathered[:i + 1], self.dim)
                        for gathered in self.gathered)
        k_ref_all = self.k_ref.wait()
        if k_ref_all.dim() <= self.dim or k_ref_all.shape[self.dim] != self.seq_len:
            raise ValueError(f"k_ref: a GatheredKeys holds the whole sequence, {self.seq_len} positions along dim "
                             f"{self.dim}, got shape {tuple(k_ref_all.shape)}")
        end = self.pieces[i].key_end
        kpm_all, segments_all = (None if t is None else t.narrow(self.mask_dim, 0, end)
                                 for t in (self.kpm, self.segments))
        return k_all, v_all, k_ref_all.narrow(self.dim, 0, end), kpm_all, segments_all


def _shard_or_none(k_ref):
    """k_ref for the shard check: None for a GatheredKeys (checked whole when it is used)."""
    return None if isinstance(k_ref, GatheredKeys) else k_ref


def _require_group(op: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"group: {op} needs an initialised torch.distributed process group")


def _checked_cu_seqlens(cu_seqlens, max_seqlen, causal: bool) -> List[int]:
    """The whole packed stream's offsets as a list (one device-to-host copy), checked as the varlen op
    checks them (a TypeError / ValueError naming the argument)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
        raise TypeError("cu_seqlens must be a (N + 1,) int32 torch.Tensor: the whole packed stream's offsets")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 1, got {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    cu = cu_seqlens.tolist()
    ops._check_cu_seqlens(cu, cu, max_seqlen, max_seqlen, cu[-1], cu[-1], causal)
    return cu


def _check_shards(group, seq_len: int, layout: str, given):
    """(rank, the layout's chunks) after checking that every given (name, tensor, dim) holds this
    rank's number of positions of a sequence of seq_len along its dim."""
    rank, world = _rank_world(group)
    layout_chunks = chunks(seq_len, world, layout)
    local = _positions(layout_chunks[rank])
    for name, t, dim in given:
        if t is not None and (not isinstance(t, Tensor) or t.dim() <= dim or t.shape[dim] != local):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: rank {rank}'s shard of a sequence of {seq_len} in layout {layout!r} has "
                             f"{local} positions along dim {dim}, got {got}")
    return rank, layout_chunks


def _local_packed_units(rank_chunks: Sequence[Tuple[int, int]], cu: List[int], causal: bool, device):
    """One unit per overlap of a local chunk with a packed sequence n: its local rows, the keys of
    sequence n it may attend (causal: up to the overlap's end) and q_pos = the overlap's first
    position inside sequence n. Returns the (U, 8) int32 table and its longest unit's rows."""
    rows, offset, longest = [], 0, 1
    for start, length in rank_chunks:
        for n in range(len(cu) - 1):
            first, last = max(start, cu[n]), min(start + length, cu[n + 1])
            if first >= last:
                continue
            seq_len = cu[n + 1] - cu[n]
            k_len = last - cu[n] if causal else seq_len
            rows.append([0, offset + first - start, last - first, cu[n], k_len, first - cu[n], 0, 0])
            longest = max(longest, last - first)
        offset += length
    if not rows:  # an empty shard: one unit with no rows
        rows.append([0, 0, 0, 0, 0, 0, 0, 0])
    return torch.tensor(rows, dtype=torch.int32, device=device), longest


def _local_units(rank_chunks: Sequence[Tuple[int, int]], batch: int, seq_len: int, causal: bool, device) -> Tensor:
    """One unit per (batch, local chunk): its local rows, the keys it may attend (causal: up to the
    chunk's end) and q_pos = the chunk's first position."""
    rows, offset = [], 0
    for start, length in rank_chunks:
        k_len = start + length if causal else seq_len
        rows += [[b, offset, length, 0, k_len, start, 0, 0] for b in range(batch)]
        offset += length
    return torch.tensor(rows, dtype=torch.int32, device=device)
