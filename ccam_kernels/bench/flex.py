"""FlexAttention under the CCAM mask: the strongest general-purpose anchor of the benchmarks.

This is not a ``ccam_attention`` backend; it exists so that every benchmark row of ours stands
next to what a user would get from ``torch.nn.attention.flex_attention`` given the same rule.

Layout: a ragged batch is packed the way varlen attention packs it. The queries of all samples
form one sequence of B*N rows (the shared (N, H, D) query is repeated per sample) and the keys
one sequence of L = sum(T_b) * P rows, the packed ``(L, Hkv, D)`` tensor as it is. Under the CCAM
rule query row ``r = b*N + i`` then sees one contiguous range of packed keys,
``[key_offsets[b], key_offsets[b] + visible_prefix_length[i])``, so the mask_mod is two
comparisons against two per-row tables computed from :mod:`ccam_kernels.mask`.

The BlockMask is built from those ranges directly, block by block, instead of by
``create_block_mask``, which evaluates the mask_mod on every (query, key) pair: B*N x L of
them, billions at 96 frames and batch 8.
"""

from __future__ import annotations

import torch

from ..checks import normalize_frame_counts
from ..mask import key_offsets, visible_prefix_length

BLOCK = 128  # FlexAttention's default BlockMask granularity, rows and columns

_compiled = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, created once per process.

    ``dynamic=False``: every shape gets its own specialized kernels, as a user who compiles
    for a fixed frame count would get (automatic dynamic shapes would give the first shape a
    static kernel and later ones a symbolic one: rows not comparable with each other). The
    recompile limit is raised for the sweep, and ``fullgraph=True`` turns what would be a
    silent fallback to eager FlexAttention (every score materialized: an anchor made to look
    far worse than it is) into an error row.
    """
    global _compiled
    if _compiled is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        _compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled


def packed_key_ranges(num_query: int, frame_counts, tokens_per_frame: int, device=None):
    """(start, end) int64 tensors of shape (B*N,): packed query row r sees keys [start[r], end[r])."""
    offsets = key_offsets(frame_counts, tokens_per_frame)
    starts, ends = [], []
    for b, t in enumerate(frame_counts):
        visible = visible_prefix_length(num_query, t, tokens_per_frame, device=device)
        starts.append(torch.full_like(visible, offsets[b]))
        ends.append(visible + offsets[b])
    return torch.cat(starts), torch.cat(ends)


def padded_key_count(num_keys: int) -> int:
    """Keys rounded up to whole blocks: the key length FlexAttention is given.

    Why: with torch 2.13's compiled CPU FlexAttention, a key length that is not a multiple of
    the block size gave wrong, run-to-run varying rows (reads past the last key; seen at
    B*N = 48 rows, L = 56 keys, errors near 1 in tests/test_bench_smoke.py). Zero keys up to
    the block edge are never live (every row's range ends at or before L), so padding changes
    no result and costs one copy, which the native layout makes anyway.
    """
    return _cdiv(num_keys, BLOCK) * BLOCK


def native_keys(x: torch.Tensor) -> torch.Tensor:
    """Packed (L, Hkv, D) keys or values -> FlexAttention's (1, Hkv, L_padded, D), zero-padded
    to whole blocks (see :func:`padded_key_count`), contiguous."""
    length = x.shape[0]
    out = x.new_zeros(1, x.shape[1], padded_key_count(length), x.shape[2])
    out[0, :, :length] = x.transpose(0, 1)
    return out


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows padded to whole blocks by repeating the last row (which changes no minimum or
    maximum of a block, and gives padded query rows a harmless range)."""
    pad = _cdiv(x.numel(), BLOCK) * BLOCK - x.numel()
    return torch.cat([x, x[-1:].expand(pad)]) if pad else x


def block_tables(start: torch.Tensor, end: torch.Tensor, num_keys: int):
    """Classify every (query block, key block) pair from the per-row key ranges.

    Returns (partial, full): bool (num_query_blocks, num_key_blocks). ``full`` blocks are live
    for every row and every key (no mask_mod needed); ``partial`` ones have at least one live
    pair and are masked element-wise. The rest are skipped. Rows are padded to whole blocks by
    repeating the last row, which changes no minimum or maximum.
    """
    nq, nk = _cdiv(start.numel(), BLOCK), _cdiv(num_keys, BLOCK)
    start, end = _pad_rows(start).view(nq, BLOCK), _pad_rows(end).view(nq, BLOCK)
    k0 = torch.arange(nk, device=start.device) * BLOCK
    k1 = (k0 + BLOCK).clamp_max(num_keys)
    # A row meets [k0, k1) iff start < k1 and end > k0; min/max over the block's rows give a
    # superset of the live blocks (a superset is safe: those blocks are masked element-wise).
    live = (start.amin(1)[:, None] < k1[None, :]) & (end.amax(1)[:, None] > k0[None, :])
    # Full iff every row's range covers the whole key block: exact, and the block must be
    # whole (a ragged last key block is always masked, so keys past L are never read as live).
    full = (start.amax(1)[:, None] <= k0[None, :]) & (end.amin(1)[:, None] >= k1[None, :])
    full &= (k1 - k0 == BLOCK)[None, :]
    return live & ~full, full


def _to_indices(blocks: torch.Tensor):
    """(count, indices) in BlockMask's (1, 1, ...) int32 layout: live block indices first."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[None, None].contiguous(), order[None, None].contiguous()


def ccam_block_mask(num_query: int, frame_counts, tokens_per_frame: int, device):
    """The BlockMask of the packed ragged batch (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    start, end = packed_key_ranges(num_query, frame_counts, tokens_per_frame, device=device)
    rows, num_keys = start.numel(), key_offsets(frame_counts, tokens_per_frame)[-1]
    # The kernels evaluate mask_mod on whole blocks, rows past B*N included: padded tables.
    start_t, end_t = _pad_rows(start), _pad_rows(end)
    partial, full = block_tables(start_t, end_t, num_keys)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= start_t[q_idx]) & (kv_idx < end_t[q_idx])

    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
        seq_lengths=(rows, padded_key_count(num_keys)),
    )


class FlexCCAMAttention:
    """Compiled FlexAttention with the CCAM block mask, callable like ``ccam_attention``.

    ``fn(q, k, v, frame_counts, tokens_per_frame, *, scale=None, dropout_p=0.0)`` with q
    (N, H, D) or (B, N, H, D), k and v (L, Hkv, D); returns (B, N, H, D). Block masks are cached
    per (N, frame counts, P, device), so they are built outside any timed call but the first.
    ``native(q, k, v, block_mask)`` runs FlexAttention itself on the packed (1, H, B*N, D) and
    (1, Hkv, L, D) layout, with no layout conversion.
    """

    def __init__(self):
        self._masks = {}

    def block_mask(self, num_query: int, frame_counts, tokens_per_frame: int, device):
        key = (num_query, tuple(frame_counts), tokens_per_frame, torch.device(device))
        if key not in self._masks:
            self._masks[key] = ccam_block_mask(num_query, frame_counts, tokens_per_frame, device)
        return self._masks[key]

    @staticmethod
    def native(q, k, v, block_mask, scale=None):
        return compiled_flex_attention()(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    def __call__(self, q, k, v, frame_counts, tokens_per_frame, *, scale=None, dropout_p=0.0):
        if dropout_p:
            raise NotImplementedError("FlexAttention has no attention dropout; call it with dropout_p=0")
        frame_counts = normalize_frame_counts("frame_counts", frame_counts)
        batch = len(frame_counts)
        n, h, d = q.shape[-3:]
        rows = (q.expand(batch, n, h, d) if q.dim() == 3 else q).reshape(batch * n, h, d)
        mask = self.block_mask(n, frame_counts, tokens_per_frame, q.device)
        # Contiguous native layout: the same strides as the attention benchmark's flex rows, so
        # both reuse one compiled graph per shape (a compile costs seconds; the copies, a few
        # microseconds per MB).
        native = [rows.transpose(0, 1)[None].contiguous(), native_keys(k), native_keys(v)]
        out = self.native(*native, mask, scale)
        return out[0].transpose(0, 1).reshape(batch, n, h, d)
