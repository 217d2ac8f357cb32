"""A bit-exact record of the parameters a stream's pushes read, and what changed since.

A stream computes the query heads once (query, query_norm, q_proj) and the keys and values of
each chunk as it arrives (feature_norm, k_proj, v_proj); ``finish()`` reads the rest of the
module (o_proj, MLP, norms, out_proj) as it is then. Its result is the output of the weights at
``finish()`` exactly when those push-side parameters are, at every push and at ``finish()``,
what they were when the stream started.

Version counters cannot tell: ``p.data`` is a new tensor with a counter of its own on every
access, so ``p.data.mul_(2)`` changes the values and leaves ``p._version`` alone, and
``p.data = other`` swaps the storage under the same Parameter. So the stream keeps a copy of
those parameters (their size, not the video's: q_proj, k_proj, v_proj, two LayerNorms, the
queries) and compares bits, dtype, device and shape. A read of M parameters costs M compared
elements per push, against the M * t * P multiply-adds of the chunk's projections.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

# The submodules and parameters that query_states and _keys_values (projector.py) read.
PUSH_SIDE = ("query", "query_norm", "attn.q_proj", "feature_norm", "attn.k_proj", "attn.v_proj")

# Same-size integer dtypes: comparing bits treats NaN as equal to itself and -0.0 as not 0.0.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def push_side_parameters(proj) -> Dict[str, torch.Tensor]:
    """{name: parameter} of the projector's push-side parameters, by their state_dict names."""
    return {name: p for name, p in proj.named_parameters()
            if any(name == part or name.startswith(part + ".") for part in PUSH_SIDE)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(_BITS.get(flat.element_size(), torch.uint8))


class ParameterSnapshot:
    """The push-side parameters of a projector as they were when this was made."""

    def __init__(self, proj) -> None:
        with torch.no_grad():
            self._saved = {name: p.detach().clone() for name, p in push_side_parameters(proj).items()}

    def change(self, proj) -> Optional[str]:
        """None if every push-side parameter is as recorded, bit for bit; else what changed,
        naming the parameter (the first one found)."""
        now = push_side_parameters(proj)
        for name, old in self._saved.items():
            p = now.get(name)
            if p is None:
                return f"{name} was removed"
            if p.dtype != old.dtype:
                return f"{name} changed dtype from {old.dtype} to {p.dtype}"
            if p.device != old.device:
                return f"{name} moved from {old.device} to {p.device}"
            if p.shape != old.shape:
                return f"{name} changed shape from {tuple(old.shape)} to {tuple(p.shape)}"
            with torch.no_grad():
                if not torch.equal(_bits(p), _bits(old)):
                    return f"{name} changed values"
        added = sorted(set(now) - set(self._saved))
        return f"{added[0]} was added" if added else None
