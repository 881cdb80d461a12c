"""Packed sequences in transformers attention calls: where the sequences of a padding-free call
start (FlashAttention's varlen convention, ``cu_seqlens`` over the call's tokens flattened
batch-major), read from the call's keyword arguments, and the block-diagonal causal attention that
goes with them. ``ral.integrations.transformers`` uses these for the chosen layers (the varlen op)
and for every other layer of a packed call (transformers' SDPA with the block-diagonal mask); see
its module docstring for what transformers hands the attention function."""

from __future__ import annotations

import bisect
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["Packing", "packed_sequences"]


class Packing(NamedTuple):
    """Where the sequences of a packed attention call start, FlashAttention's varlen convention
    over the call's tokens flattened batch-major (T = B * S): sequence n owns query rows
    ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` and keys ``cu_seqlens_k[n]:cu_seqlens_k[n+1]``."""

    cu_seqlens_q: Tensor          # (N + 1,) int32, on the call's device
    cu_seqlens_k: Tensor          # (N + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int

    def to(self, device) -> "Packing":
        return self._replace(cu_seqlens_q=self.cu_seqlens_q.to(device), cu_seqlens_k=self.cu_seqlens_k.to(device))

    def same_as(self, other: "Packing") -> bool:
        device = self.cu_seqlens_q.device
        return (torch.equal(self.cu_seqlens_q, other.cu_seqlens_q.to(device))
                and torch.equal(self.cu_seqlens_k, other.cu_seqlens_k.to(device)))


def packed_sequences(kwargs: dict, batch: int, q_len: int, k_len: int, padded: bool = False) -> Optional[Packing]:
    """The packing of a transformers attention call, or None for an ordinary (padded) batch.

    Args:
        kwargs: the attention function's keyword arguments. ``cu_seq_lens_q`` / ``cu_seq_lens_k``
            (with ``max_length_q`` / ``max_length_k``; the flash-attention path) give the packing
            directly. Otherwise ``position_ids`` (B, S) that do not go up by one somewhere start new
            sequences there, as in ``transformers.masking_utils.find_packed_sequence_indices``.
        batch, q_len, k_len: the call's B, query length and key length.
        padded: the call has a 2-D padding mask with padding. Then ``position_ids`` never mean
            packing (left-padded batches have repeated positions; transformers, too, looks for packed
            position ids only without a mask), and ``cu_seq_lens_*`` raise: a packed batch has no padding.
    Position-id packing needs q_len == k_len (no KV-cache prefix). Reading position ids costs one
    device-to-host copy; the result is remembered for the same tensor, so one model call pays it once.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError("cu_seq_lens_q / cu_seq_lens_k: give both or neither")
        if padded:
            raise ValueError("cu_seq_lens_q: a packed call (flash-attention kwargs) must not have a padding "
                             "attention_mask; pass attention_mask=None")
        max_q, max_k = (None if kwargs.get(name) is None else int(kwargs[name])
                        for name in ("max_length_q", "max_length_k"))
        return _remembered((cu_q, cu_k), (batch, q_len, k_len, max_q, max_k),
                           lambda: _packing_from_cu(cu_q, cu_k, max_q, max_k, batch * q_len, batch * k_len))
    position_ids = kwargs.get("position_ids")
    if padded or q_len != k_len or not isinstance(position_ids, Tensor) or position_ids.dim() != 2 \
            or position_ids.shape[-1] != q_len or position_ids.shape[0] not in (1, batch):
        return None
    return _remembered((position_ids,), (batch,), lambda: packing_from_positions(position_ids, batch))


# The last packing found, for the same tensors (identity and version): every decoder layer of one
# model call asks for it, and each answer costs a device-to-host copy.
_LAST: list = [(), None, None]


def _remembered(tensors: tuple, key: tuple, compute) -> Optional[Packing]:
    key = key + tuple(t._version for t in tensors)
    held, held_key, packing = _LAST
    if len(held) == len(tensors) and all(a is b for a, b in zip(held, tensors)) and held_key == key:
        return packing
    packing = compute()
    _LAST[:] = [tensors, key, packing]
    return packing


def _packing_from_cu(cu_q: Tensor, cu_k: Tensor, max_q, max_k, total_q: int, total_k: int) -> Packing:
    host = []
    for name, cu, total in (("cu_seq_lens_q", cu_q, total_q), ("cu_seq_lens_k", cu_k, total_k)):
        values = cu.tolist() if isinstance(cu, Tensor) and cu.dim() == 1 else None
        if not values or values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name}: must be a 1-D tensor 0, ..., {total} (non-decreasing, the call's B * S "
                             f"tokens), got {values if values is not None else cu}")
        host.append(values)
    if len(host[0]) != len(host[1]):
        raise ValueError(f"cu_seq_lens_k: {len(host[1]) - 1} sequences, cu_seq_lens_q has {len(host[0]) - 1}")
    longest_q = max(b - a for a, b in zip(host[0], host[0][1:]))
    longest_k = max(b - a for a, b in zip(host[1], host[1][1:]))
    return Packing(cu_q.to(torch.int32), cu_k.to(torch.int32),
                   longest_q if max_q is None else max(max_q, longest_q),
                   longest_k if max_k is None else max(max_k, longest_k))


def packing_from_positions(position_ids: Tensor, batch: int) -> Optional[Packing]:
    pos = position_ids.expand(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1           # a new sequence where positions do not go up by one
    if not bool(starts[:, 1:].any()):
        return None
    cu = torch.cat([starts.reshape(-1).nonzero().flatten(),
                    torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return Packing(cu, cu, longest, longest)


def one_sequence(length: int, device) -> Packing:
    cu = torch.tensor([0, length], dtype=torch.int32, device=device)
    return Packing(cu, cu, length, length)


def flat_tokens(t: Tensor) -> Tensor:
    """(B, heads, S, dim) -> (B * S, heads, dim), batch-major (a view when B == 1)."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b * s, h, d)


def _block_causal_mask(packing: Packing, total_q: int, total_k: int, device,
                       sliding_window: Optional[int] = None) -> Tensor:
    """(1, 1, Tq, Tk) bool: each row sees the keys of its own sequence, causal bottom-right within it
    (and, with ``sliding_window``, only the last ``sliding_window`` of them, as transformers' mask)."""
    seq_q, row_pos, seq_k, key_pos = (t[0] for t in packed_places(packing, 1, total_q, total_k, device))
    mask = (seq_q[:, None] == seq_k[None, :]) & (key_pos[None, :] <= row_pos[:, None])
    if sliding_window is not None:
        mask &= key_pos[None, :] > row_pos[:, None] - sliding_window
    return mask[None, None]


def packed_places(packing: Packing, batch: int, q_len: int, k_len: int, device) -> Tuple[Tensor, ...]:
    """Where each token of a packed call sits, its B * S tokens flattened batch-major and viewed as
    (B, S): (sequence of each query row, its position, sequence of each key, its position), long
    tensors (B, Sq), (B, Sq), (B, Sk), (B, Sk). Row positions are aligned bottom-right to their
    sequence's keys, so key j is causal for row i iff it is in i's sequence at a position <= i's."""
    cu_q, cu_k = packing.cu_seqlens_q.to(device, torch.long), packing.cu_seqlens_k.to(device, torch.long)
    rows = torch.arange(batch * q_len, device=device)
    keys = torch.arange(batch * k_len, device=device)
    seq_q = torch.searchsorted(cu_q, rows, right=True) - 1  # a row's sequence (empty sequences are skipped)
    seq_k = torch.searchsorted(cu_k, keys, right=True) - 1
    shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])  # key length - query length per sequence
    row_pos = rows - cu_q[seq_q] + shift[seq_q]
    key_pos = keys - cu_k[seq_k]
    return (seq_q.view(batch, q_len), row_pos.view(batch, q_len), seq_k.view(batch, k_len),
            key_pos.view(batch, k_len))


def sdpa_packed(module, query: Tensor, key: Tensor, value: Tensor, packing: Packing, scale, dropout, **kwargs):
    """transformers' SDPA over the flattened call with the block-diagonal causal mask -> (B, S, H, Dv)."""
    b, s = query.shape[0], query.shape[2]

    def stream(t):                                     # (B, heads, S, dim) -> (1, heads, B * S, dim)
        return flat_tokens(t).transpose(0, 1).unsqueeze(0)

    kwargs = {k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                            "max_length_k", "position_ids", "is_causal")}
    mask = _block_causal_mask(packing, b * s, key.shape[0] * key.shape[2], query.device,
                              kwargs.pop("sliding_window", None))
    out, _ = sdpa_attention_forward(module, stream(query), stream(key), stream(value), mask, dropout=dropout,
                                    scaling=scale, **kwargs)
    return out.reshape(b, s, *out.shape[2:]), None


def key_windows(packing: Packing, batch: int, q_len: int, k_len: int, step: int) -> List[Tuple[int, int]]:
    """For each block of ``step`` query rows of a packed call of ``batch`` rows, the keys (lo, hi) of
    a row (over every batch row) that hold the sequences of the block's query rows: the only keys the
    mask check compares (so a packed call costs about sum over sequences of length x block, not S^2)."""
    cu_q, cu_k = packing.cu_seqlens_q.tolist(), packing.cu_seqlens_k.tolist()
    windows = []
    for start in range(0, q_len, step):
        end = min(start + step, q_len)
        lo, hi = k_len, 0
        for b in range(batch):
            first = bisect.bisect_right(cu_q, b * q_len + start) - 1      # sequences of the block's rows
            last = bisect.bisect_right(cu_q, b * q_len + end - 1) - 1
            lo = min(lo, max(0, cu_k[first] - b * k_len))
            hi = max(hi, min(k_len, cu_k[last + 1] - b * k_len))
        windows.append((lo, max(lo, hi)))
    return windows
