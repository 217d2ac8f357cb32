"""What each kernel launches and what each of its CTAs does, in launch order (x fastest, as
the hardware hands blocks out), for the cuda and triton backends.

Grids and tiles come from the launchers' own numbers: the CUDA tile constants in
cuda_backend.py (checked against csrc/ccam by tests/test_cuda_build.py), the key-tile plan
and split factor of tiling.py, Triton's block sizes from triton_kernels.gpu_block_sizes. The
CUDA geometry helpers themselves (fwd_geometry, dq_geometry, dkdv_geometry) are constexpr C++;
``cuda_geometry`` restates them, and tests/test_perf_model.py checks every field against the
geometry the emulator's launch received. Per-CTA work (key or query tiles visited) follows the
mask rule through ccam_kernels.mask, exactly as the kernels bound their loops (rule.cuh)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import mask
from ..backends import cuda_backend, tiling

SMS = 132  # H100 SXM
MMA_FLOPS = 2 * 16 * 8 * 16  # one mma.sync.m16n8k16, per warp


@dataclass(frozen=True)
class Shape:
    num_query: int
    heads: int
    kv_heads: int
    head_dim: int
    tokens_per_frame: int
    frame_counts: tuple
    dtype: str = "bf16"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def elem_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2


@dataclass
class Launch:
    """One kernel launch: its grid, threads and dynamic shared memory, and per CTA in launch
    order the tensor-core FLOPs it issues, the bytes it moves through L2, and (cuda) its
    mma.sync warp instructions."""

    backend: str
    kernel: str
    grid: tuple
    threads: int
    smem_bytes: int
    flops: list = field(default_factory=list)
    l2_bytes: list = field(default_factory=list)
    mma: list = field(default_factory=list)
    splits: int = 1
    block: tuple = ()

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def padded_head_dim(d: int) -> int:
    """params.h padded_head_dim: the kernel width a head dim runs in."""
    return 32 if d <= 32 else 64 if d <= 64 else 96 if d <= 96 else 128


def bwd_inner(dp: int) -> int:
    """bwd.cuh kBwdInner: the dQ pass's key tile and the dK/dV pass's query tile."""
    return 64 if dp <= 64 else 32


def _pitch(dp: int) -> int:
    return dp + 8  # tile.cuh kPitch: 8 elements of padding against bank conflicts


def cuda_geometry(kernel: str, s: Shape, splits: int = 1, num_key_tiles: int = 0) -> tuple:
    """((grid_x, grid_y, grid_z), threads, smem_bytes) of fwd_geometry / dq_geometry /
    dkdv_geometry (fwd.cuh, bwd.cuh)."""
    dp, e = padded_head_dim(s.head_dim), s.elem_bytes
    query_tiles = -(-s.num_query // cuda_backend.FWD_BLOCK_M)
    bh = len(s.frame_counts) * s.heads
    if kernel == "fwd":
        smem = (cuda_backend.FWD_BLOCK_M + 4 * cuda_backend.FWD_BLOCK_N) * _pitch(dp) * e
        return (bh, query_tiles, splits), 128, smem
    inner = bwd_inner(dp)
    if kernel == "dq":
        return (bh, query_tiles, splits), 128, (2 * 64 + 4 * inner) * _pitch(dp) * e
    smem = (2 * cuda_backend.BWD_KEY_TILE + 4 * inner) * _pitch(dp) * e + 4 * inner * 4
    return (num_key_tiles, s.heads // s.group, 1), 128, smem


def _key_limits(s: Shape, frames: int) -> list:
    """Each row's visible-key limit in its sample (rule.cuh key_limit over the whole video)."""
    return mask.visible_prefix_length(s.num_query, frames, s.tokens_per_frame).tolist()


def _query_tile_bounds(s: Shape, block_m: int) -> list:
    """Per sample, per query tile in launch order (longest first: rule.cuh query_tile takes
    tile gridDim.y - 1 - blockIdx.y), the tile's (lo, hi) key bounds."""
    tiles = -(-s.num_query // block_m)
    out = []
    for t in s.frame_counts:
        lim = _key_limits(s, t)
        per = []
        for y in range(tiles):
            m0 = (tiles - 1 - y) * block_m
            per.append((lim[m0], lim[min(m0 + block_m, s.num_query) - 1]))
        out.append(per)
    return out


def _split_tiles(hi: int, block_n: int, splits: int, z: int) -> int:
    """Key tiles of split z of a query tile whose keys end at hi (fwd.cuh's split arithmetic)."""
    if splits == 1:
        return -(-hi // block_n)
    tiles = -(-hi // block_n)
    per_split = -(-tiles // splits)
    key_lo = min(z * per_split, tiles) * block_n
    key_hi = min(key_lo + per_split * block_n, hi)
    return -(-(key_hi - key_lo) // block_n) if key_hi > key_lo else 0


def _row_tiles_of_key_tiles(s: Shape, block_n: int, block_m: int) -> tuple:
    """(tile_sample, query-row tiles each key tile walks per head) from tiling.window_plan's
    key-tile list and the rule's first row of each key's frame (mask.first_query_of_frame)."""
    plan = tiling.window_plan(tuple(s.frame_counts), tiling.whole_videos(tuple(s.frame_counts)),
                              s.tokens_per_frame, block_n, torch.device("cpu"))
    first_rows = [mask.first_query_of_frame(s.num_query, t) for t in s.frame_counts]
    samples, steps = plan.tile_sample.tolist(), []
    for b, start in zip(samples, plan.tile_start.tolist()):
        rows_from = first_rows[b][start // s.tokens_per_frame]
        m_begin = rows_from // block_m * block_m
        steps.append(-(-(s.num_query - m_begin) // block_m))
    return samples, steps


def cuda_launches(s: Shape, sms: int = SMS, splits: int | None = None) -> dict:
    """{"fwd", "dq", "dkdv": Launch} of the cuda backend for shape s; ``splits``: the forward's
    key splits (default: what tiling picks on a GPU with ``sms`` SMs)."""
    dp, e, D, B = padded_head_dim(s.head_dim), s.elem_bytes, s.head_dim, len(s.frame_counts)
    bm, bn = cuda_backend.FWD_BLOCK_M, cuda_backend.FWD_BLOCK_N
    query_tiles = -(-s.num_query // bm)
    if splits is None:
        splits = tiling.splits_for_sms(B * s.heads * query_tiles, tuple(s.frame_counts), s.tokens_per_frame, bn, sms)
    bounds = _query_tile_bounds(s, bm)
    out = {}

    grid, threads, smem = cuda_geometry("fwd", s, splits)
    fwd = Launch("cuda", "fwd", grid, threads, smem, splits=splits, block=(bm, bn))
    o_bytes = 4 if splits > 1 else e
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                n = _split_tiles(bounds[x // s.heads][y][1], bn, splits, z)
                # per warp and key tile: S and P V (dp * bn / 128 each) and the row sums on the
                # tensor cores (bn / 16: P times a block of ones; the kernel without dropout)
                fwd.mma.append(4 * n * (dp * bn // 64 + bn // 16))
                fwd.l2_bytes.append(bm * D * e + n * 2 * bn * D * e + bm * D * o_bytes)
    out["fwd"] = fwd

    inner = bwd_inner(dp)
    # The dQ pass splits each query tile's keys as the forward does (cuda_backend._backward_launch).
    grid, threads, smem = cuda_geometry("dq", s, splits)
    dq = Launch("cuda", "dq", grid, threads, smem, splits=splits, block=(bm, inner))
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                n = _split_tiles(bounds[x // s.heads][y][1], inner, splits, z)
                dq.mma.append(4 * n * 3 * dp * inner // 128)
                dq.l2_bytes.append(2 * bm * D * e + n * 2 * inner * D * e + bm * D * 4 + 2 * bm * 4)
    out["dq"] = dq

    samples, steps = _row_tiles_of_key_tiles(s, cuda_backend.BWD_KEY_TILE, inner)
    grid, threads, smem = cuda_geometry("dkdv", s, num_key_tiles=len(samples))
    dkdv = Launch("cuda", "dkdv", grid, threads, smem, block=(cuda_backend.BWD_KEY_TILE, inner))
    kt = cuda_backend.BWD_KEY_TILE
    for _ in range(grid[1]):
        for n in steps:
            walked = n * s.group
            dkdv.mma.append(4 * walked * 4 * dp * inner // 128)
            dkdv.l2_bytes.append(4 * kt * D * e + walked * (2 * inner * D * e + 2 * inner * 4))
    out["dkdv"] = dkdv
    for launch in out.values():
        launch.flops = [m * MMA_FLOPS for m in launch.mma]
    return out


# The sm_90a forward's tiles (fwd_sm90.cuh Sm90FwdTiles): 128 query rows per CTA in three
# warpgroups (a TMA producer, two wgmma consumers of 64 rows), key tiles of 128 at padded head
# dim 64 and of 64 at 128; shared memory: 1 KB of barriers, Q, and per ring stage K, V and the
# NaN rule's raw V copy. tests/test_perf_model.py checks grid, threads, shared memory and the
# wgmma work per CTA against the emulator's launch.
SM90_BLOCK_M, SM90_THREADS, SM90_STAGES = 128, 384, 2
WGMMA_N8_FLOPS = 2 * 64 * 8 * 16  # one m64n8k16 step of a warpgroup's wgmma


def sm90_width(d: int) -> int:
    """The sm_90a forward's padded head dim (launch_fwd_sm90<T, DP <= 64 ? 64 : 128>)."""
    return 64 if padded_head_dim(d) <= 64 else 128


def sm90_block_n(dp: int) -> int:
    return 128 if dp == 64 else 64


def sm90_geometry(s: Shape, splits: int = 1) -> tuple:
    """((grid_x, grid_y, grid_z), threads, smem_bytes) of fwd_sm90_geometry (fwd_sm90.cuh)."""
    dp = sm90_width(s.head_dim)
    bn = sm90_block_n(dp)
    smem = 1024 + SM90_BLOCK_M * dp * 2 + 3 * SM90_STAGES * bn * dp * 2
    return (len(s.frame_counts) * s.heads, -(-s.num_query // SM90_BLOCK_M), splits), SM90_THREADS, smem


def _split_range(hi: int, block_n: int, splits: int, z: int) -> tuple:
    """(key_lo, key_hi) of split z of a query tile whose keys end at hi (fwd.cuh, fwd_sm90.cuh)."""
    if splits == 1:
        return 0, hi
    tiles = -(-hi // block_n)
    per_split = -(-tiles // splits)
    key_lo = min(z * per_split, tiles) * block_n
    return key_lo, min(key_lo + per_split * block_n, hi)


def cuda_sm90_launches(s: Shape, sms: int = SMS, splits: int | None = None) -> dict:
    """{"fwd": Launch} of the cuda backend's sm_90a forward (fwd_sm90.cuh) for shape s; its
    ``mma`` is each CTA's wgmma work in m64n8k16 steps (the emulator's wgmma_counts): each
    consumer warpgroup (64 rows) runs S = Q K^T and O += P V, DP * BN / 64 steps per key tile,
    over the CTA's tiles up to its own last row's limit. ``splits``: what the host picks
    (cuda_backend plans the splits from the mma.sync tiles, whichever kernel runs)."""
    dp, e, D, B, N = sm90_width(s.head_dim), s.elem_bytes, s.head_dim, len(s.frame_counts), s.num_query
    bm, bn = SM90_BLOCK_M, sm90_block_n(dp)
    if splits is None:
        programs = B * s.heads * -(-N // cuda_backend.FWD_BLOCK_M)
        splits = tiling.splits_for_sms(programs, tuple(s.frame_counts), s.tokens_per_frame, cuda_backend.FWD_BLOCK_N,
                                       sms)
    limits = [_key_limits(s, t) for t in s.frame_counts]
    grid, threads, smem = sm90_geometry(s, splits)
    fwd = Launch("cuda_sm90", "fwd", grid, threads, smem, splits=splits, block=(bm, bn))
    o_bytes = 4 if splits > 1 else e
    for z in range(grid[2]):
        for y in range(grid[1]):
            m0 = (grid[1] - 1 - y) * bm
            for x in range(grid[0]):
                lim = limits[x // s.heads]
                key_lo, key_hi = _split_range(lim[min(m0 + bm, N) - 1], bn, splits, z)
                n = -(-(key_hi - key_lo) // bn) if key_hi > key_lo else 0
                steps = 0
                for first in (m0, m0 + 64):  # the consumer warpgroups' rows
                    wg_hi = min(lim[min(first + 63, N - 1)], key_hi) if first < N else key_lo
                    mine = min(n, -(-(wg_hi - key_lo) // bn)) if wg_hi > key_lo else 0
                    steps += mine * dp * bn // 64
                fwd.mma.append(steps)
                fwd.l2_bytes.append(bm * D * e + n * 2 * bn * D * e + bm * D * o_bytes)
    fwd.flops = [m * WGMMA_N8_FLOPS for m in fwd.mma]
    return {"fwd": fwd}


def triton_launches(s: Shape, sms: int = SMS) -> dict:
    """{"fwd", "dq", "dkdv": Launch} of the triton backend (block sizes as on a GPU); FLOPs
    per CTA are its tl.dot shapes (BLOCK_D wide) times the tiles its loops visit."""
    from ..backends import triton_kernels

    bm, bn, bd = triton_kernels.gpu_block_sizes(s.head_dim)
    D, e, B = s.head_dim, s.elem_bytes, len(s.frame_counts)
    query_tiles = -(-s.num_query // bm)
    splits = tiling.splits_for_sms(B * s.heads * query_tiles, tuple(s.frame_counts), s.tokens_per_frame, bn, sms)
    bounds = _query_tile_bounds(s, bm)
    dot = 2 * bm * bn * bd
    out = {}
    fwd = Launch("triton", "fwd", (B * s.heads, query_tiles, splits), 0, 0, splits=splits, block=(bm, bn))
    o_bytes = 4 if splits > 1 else e
    for z in range(splits):
        for y in range(query_tiles):
            for x in range(B * s.heads):
                n = _split_tiles(bounds[x // s.heads][y][1], bn, splits, z)
                fwd.flops.append(2 * n * dot)
                fwd.l2_bytes.append(bm * D * e + n * 2 * bn * D * e + bm * D * o_bytes)
    out["fwd"] = fwd
    dq = Launch("triton", "dq", (B * s.heads, query_tiles, 1), 0, 0, block=(bm, bn))
    for y in range(query_tiles):
        for x in range(B * s.heads):
            n = -(-bounds[x // s.heads][y][1] // bn)
            dq.flops.append(3 * n * dot)
            dq.l2_bytes.append(2 * bm * D * e + n * 2 * bn * D * e + bm * D * 4 + 2 * bm * 4)
    out["dq"] = dq
    rm = triton_kernels.gpu_block_sizes(s.head_dim, "dkdv")[0]  # dK/dV's row tile (32 at head dim 128)
    samples, steps = _row_tiles_of_key_tiles(s, bn, rm)
    dkdv = Launch("triton", "dkdv", (len(samples), s.heads // s.group, 1), 0, 0, block=(bn, rm))
    for _ in range(s.heads // s.group):
        for n in steps:
            walked = n * s.group
            dkdv.flops.append(4 * walked * 2 * rm * bn * bd)
            dkdv.l2_bytes.append(4 * bn * D * e + walked * (2 * rm * D * e + 2 * rm * 4))
    out["dkdv"] = dkdv
    return out
