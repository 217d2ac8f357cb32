"""Frame-parallel projector over a torch.distributed process group.

    y = proj(local_features, local_split_sizes, group=process_group)

Each rank holds consecutive frames of each video (rank order = frame order; any split, zero
frames allowed). Per call:

1. one all-gather of the split sizes (with P, the dropout seeds and any argument error, so a bad
   argument on one rank raises the same error on every rank instead of hanging the others);
2. local K/V and the partial attention of every query over this rank's frames (``partial``),
   with attention dropout in training: rank 0's seed on every rank, and the mask is a function
   of the key's position in the whole video (ccam_kernels.dropout), so the merged attention is
   the one-process one with that seed;
3. one all-reduce (MAX) of the partial LSEs, (B, H, N) floats: the common shift that keeps
   exp() finite with logits in the thousands;
4. one all-reduce (SUM) of [w * out, w], (B, N, H, D + 1) floats, w = exp(lse - shift): the
   merged attention is their ratio; then the rest of the projector runs on every rank.

Gradients. Every rank runs the same head on the same merged attention, so when every rank
backpropagates the same loss, the gradient of the merged attention is the same everywhere;
each rank turns it into its own partial's gradients locally (no collective). The parameters
that feed the partial attention (query side, feature_norm, k/v_proj) get only this rank's
share of their gradient, so they enter through :class:`_SumGradients`, an identity whose
backward all-reduces their gradients in one flat buffer. Every rank then holds every
parameter's whole gradient, and each rank's features the gradient of their own frames.
"""

from __future__ import annotations

import torch

from ..backends.attention_ops import draw_seed
from ..checks import as_int, integer_tensor_values
from .partial import ccam_partial_attention, partial_backend_of


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("group= needs torch.distributed, which this PyTorch build does not provide")
    if not dist.is_initialized():
        raise RuntimeError("group= needs an initialized process group (torch.distributed.init_process_group)")
    return dist


class _SumGradients(torch.autograd.Function):
    """Identity forward; backward all-reduces (SUM) the gradients of all inputs at once."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.shapes = [t.shape for t in tensors]
        ctx.meta = (tensors[0].dtype, tensors[0].device)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        dtype, device = ctx.meta
        flat = torch.cat([
            (g if g is not None else torch.zeros(shape, dtype=dtype, device=device)).reshape(-1)
            for g, shape in zip(grads, ctx.shapes)
        ])
        _dist().all_reduce(flat, op=_dist().ReduceOp.SUM, group=ctx.group)
        return (None, *(part.view(shape) for part, shape in zip(flat.split([s.numel() for s in ctx.shapes]), ctx.shapes)))


class _MergeOverGroup(torch.autograd.Function):
    """(this rank's partial out (B, N, H, D), lse (B, H, N)) -> the merged attention (B, N, H, D).

    With a_r = exp(lse_r - lse) the weight of rank r's partial in the merged output O, the
    gradient (the same dO on every rank) is d out_r = a_r dO and d lse_r = a_r * rowsum((out_r - O) dO):
    purely local."""

    @staticmethod
    def forward(ctx, out, lse, group):
        dist = _dist()
        shift = lse.clone()
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros((), dtype=shift.dtype, device=shift.device))
        w = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)  # (B, N, H, 1); -inf -> 0
        packed = torch.cat([w * out, w], dim=-1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        # Every query sees frame 0, which some rank holds, so the total weight is >= 1 (the shift's own term).
        total = packed[..., -1:]
        merged = packed[..., :-1] / total
        ctx.save_for_backward(out, merged, w / total)
        return merged

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dmerged):
        out, merged, a = ctx.saved_tensors
        dout = a * dmerged
        dlse = (a.squeeze(-1) * ((out - merged) * dmerged).sum(-1)).transpose(1, 2)
        return dout, dlse, None


def _local_args(proj, features, split_sizes):
    """(packed (F, P, Cv) features, local split sizes) checked on this rank alone."""
    cfg = proj.config
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() == 4:
        if split_sizes is not None:
            raise ValueError(f"split_sizes must be None when features is (B, t, P, Cv), got {split_sizes!r}")
        b, t = features.shape[:2]
        splits = (t,) * b
        features = features.reshape(b * t, *features.shape[2:])
    elif features.dim() == 3:
        if split_sizes is None:
            raise ValueError("split_sizes is required when features is (F, P, Cv)")
        if isinstance(split_sizes, torch.Tensor):  # as frame_counts: integer, 1-D, not meta
            split_sizes = integer_tensor_values("split_sizes", split_sizes)
        if not isinstance(split_sizes, (list, tuple, range)) or len(split_sizes) == 0:
            raise ValueError(f"split_sizes must be a non-empty sequence of ints >= 0 (frames of each video "
                             f"on this rank), got {split_sizes!r}")
        splits = tuple(as_int("split_sizes element", t) for t in split_sizes)
        if min(splits) < 0:
            raise ValueError(f"split_sizes must be >= 0 for every video, got {list(splits)}")
        if sum(splits) != features.shape[0]:
            raise ValueError(f"split_sizes {list(splits)} add up to {sum(splits)} frames, but features has "
                             f"F={features.shape[0]}")
    else:
        raise ValueError(f"features must be (F, P, Cv) or (B, t, P, Cv), got shape {tuple(features.shape)}")
    if features.shape[-1] != cfg.cross_hidden_size:
        raise ValueError(f"features width must equal cross_hidden_size={cfg.cross_hidden_size}, got {features.shape[-1]}")
    if features.shape[1] < 1:
        raise ValueError(f"features must have P >= 1 tokens per frame, got shape {tuple(features.shape)}")
    param = proj.query
    if features.dtype != param.dtype:
        raise ValueError(f"features dtype must match the module's ({param.dtype}), got {features.dtype}")
    if features.device != param.device:
        raise ValueError(f"features device must match the module's ({param.device}), got {features.device}")
    return features, splits


def _exchange(proj, features, split_sizes, group, dist):
    """All-gather of (splits, P, seeds, error) -> (features, local splits, every rank's splits, P,
    (hidden dropout seed, attention dropout seed)): rank 0's seeds. Raises on every rank when
    any rank's arguments are bad, naming that rank."""
    cfg = proj.config
    error = features_out = splits = None
    try:
        features_out, splits = _local_args(proj, features, split_sizes)
    except (TypeError, ValueError) as exc:
        error = (type(exc).__name__, str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else raised here must reach every rank too (no hang)
        error = ("ValueError", f"{type(exc).__name__} while checking the arguments: {exc}")
    tokens = None if error else features_out.shape[1]
    # Attention dropout: drawn first, as the one-process forward draws it (ccam_attention), from
    # torch's generator for the module's device, so torch.manual_seed gives the same masks.
    attn_seed = None
    if proj.training and cfg.attention_dropout > 0:
        attn_seed = int(draw_seed(proj.query.device))
    # Hidden dropout must draw the same masks on every rank: rank 0's seed is everyone's.
    seed = int(torch.randint(0, 2**62, (1,))) if proj.training and cfg.dropout > 0 else None
    seed = (seed, attn_seed)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (splits, tokens, seed, error), group=group)
    errors = [(r, e) for r, (_, _, _, e) in enumerate(gathered) if e is not None]
    if errors:
        kind = TypeError if all(e[0] == "TypeError" for _, e in errors) else ValueError
        raise kind("; ".join(f"rank {r}: {msg}" for r, (_, msg) in errors))
    all_splits = [s for s, _, _, _ in gathered]
    if len({len(s) for s in all_splits}) != 1:
        raise ValueError(f"every rank must pass split_sizes for the same videos; numbers of videos per rank: "
                         f"{[len(s) for s in all_splits]}")
    if len({p for _, p, _, _ in gathered}) != 1:
        raise ValueError(f"every rank must have the same tokens per frame P; got {[p for _, p, _, _ in gathered]}")
    totals = [sum(col) for col in zip(*all_splits)]
    if min(totals) < 1:
        raise ValueError(f"every video needs at least one frame over the group; frames per video: {totals}")
    return features_out, splits, all_splits, tokens, gathered[0][2]


def frame_parallel_forward(proj, features, split_sizes, group):
    """The projector with this rank's frames of each video; returns the full (B, N, O) on every rank."""
    dist = _dist()
    cfg = proj.config
    backend = partial_backend_of(proj)
    features, splits, all_splits, P, (seed, attn_seed) = _exchange(proj, features, split_sizes, group, dist)
    rank = dist.get_rank(group)
    totals = [sum(col) for col in zip(*all_splits)]
    firsts = [sum(s[b] for s in all_splits[:rank]) for b in range(len(splits))]
    ranges = [(f0, f0 + t) for f0, t in zip(firsts, splits)]

    # The parameters that meet this rank's frames only: their gradients are summed over the group.
    shared = [proj.query, proj.query_norm.weight, proj.query_norm.bias, proj.attn.q_proj.weight,
              proj.attn.q_proj.bias, proj.feature_norm.weight, proj.feature_norm.bias,
              proj.attn.k_proj.weight, proj.attn.k_proj.bias, proj.attn.v_proj.weight, proj.attn.v_proj.bias]
    live = [i for i, p in enumerate(shared) if p is not None and p.requires_grad]
    if torch.is_grad_enabled() and live:
        summed = _SumGradients.apply(group, *(shared[i] for i in live))
        for i, t in zip(live, summed):
            shared[i] = t
    q = proj._query_states(shared[:5])
    kv_weights = shared[5:]
    k, v = proj._keys_values(features.reshape(-1, cfg.cross_hidden_size), kv_weights)
    if attn_seed is None:
        out, lse = ccam_partial_attention(q, k, v, totals, P, ranges, backend=backend)
    else:
        out, lse = ccam_partial_attention(q, k, v, totals, P, ranges, dropout_p=cfg.attention_dropout, seed=attn_seed,
                                          backend=backend)
    attn = _MergeOverGroup.apply(out, lse, group).to(proj.query.dtype)
    if seed is None:
        return proj._head(attn)
    # Same dropout masks on every rank: rank 0's seed, in a fork so the caller's RNG is untouched.
    cuda = attn.device.type == "cuda"
    with torch.random.fork_rng(devices=[attn.device.index] if cuda else []):
        if cuda:
            with torch.cuda.device(attn.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        return proj._head(attn)


def allreduce_bytes(batch: int, num_query: int, num_heads: int, head_dim: int, itemsize: int) -> dict:
    """Bytes each rank contributes to the two all-reduces of one forward (for the benchmark)."""
    return {"max_lse": batch * num_heads * num_query * itemsize,
            "sum_partials": batch * num_query * num_heads * (head_dim + 1) * itemsize}
