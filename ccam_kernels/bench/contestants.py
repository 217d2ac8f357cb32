"""What a benchmark row times: our backends and the anchors, each on the same inputs.

Every case builds its inputs once in our layout (q (N, H, D) shared by the batch, packed k/v
(L, Hkv, D), the projector's packed features), in a few rotated copies. Each contestant turns
them into its own native layout once, outside the timed region: an anchor is timed on what it
computes, never on our layout conversions. ``canonical`` maps its results back to ours, so the
error against the reference is measured on the same tensors for every row.

Attention contestants:
    reference, torch, triton, cuda   ccam_attention backends ("reference" anchors the errors)
    sdpa-efficient, sdpa-cudnn       (CUDA) SDPA with the dense mask under that SDPA backend
    sdpa-flash                       (CPU) SDPA with the dense mask, PyTorch's CPU flash kernel
    flex                             compiled FlexAttention with the CCAM block mask
Projector contestants: the same CCAMProjector (one set of weights) with its attention from
reference, torch, triton, cuda, or flex.

The "reference" contestant times the reference backend's plain formula (SDPA with the dense
mask, backward by autograd: ``reference_formula``), not the ``reference_attention`` op, which
also materializes the dense scores for the LSE that ``ccam_attention`` callers never read; that
LSE made the reference several times slower than SDPA with the same mask.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torch.nn.functional as F

from ..attention import BACKENDS, ccam_attention
from ..checks import check_attention_args
from ..mask import dense_mask, key_offsets
from ..projector import CCAMProjector
from . import names
from .flex import FlexCCAMAttention, native_keys

def reference_formula(q, k, v, frame_counts, tokens_per_frame, *, scale=None, dropout_p=0.0):
    """The reference backend's output without its LSE, callable like ``ccam_attention``: what
    the "reference" row times. The same function the reference op runs (and differentiates).
    With dropout its seed is drawn as ``ccam_attention`` draws one (draw_seed), so after the
    same torch.manual_seed both apply the same mask."""
    from ..backends.attention_ops import draw_seed
    from ..backends.reference import _attend

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = draw_seed(q.device) if dropout_p > 0 else None
    return _attend(q, k, v, tuple(int(t) for t in frame_counts), tokens_per_frame, scale, dropout_p, seed)


OURS = tuple(name for name in BACKENDS if name != "reference")
SDPA_ANCHORS = {  # name -> (SDPBackend member, devices it runs on)
    "sdpa-efficient": ("EFFICIENT_ATTENTION", ("cuda",)),
    "sdpa-cudnn": ("CUDNN_ATTENTION", ("cuda",)),
    "sdpa-flash": ("FLASH_ATTENTION", ("cpu",)),  # on CUDA the flash kernel takes no mask
}
ANCHORS = (*SDPA_ANCHORS, "flex")
ATTENTION_CONTESTANTS = ("reference", *OURS, *ANCHORS)
PROJECTOR_CONTESTANTS = ("reference", *OURS, "flex")
# The command line offers these names without importing torch (names.py): they must agree.
assert (ATTENTION_CONTESTANTS, PROJECTOR_CONTESTANTS) == (names.ATTENTION_CONTESTANTS, names.PROJECTOR_CONTESTANTS), \
    "bench/names.py is out of date"


class Unsupported(Exception):
    """This contestant cannot run this case (a row with status "unsupported")."""


def kind_of(name: str) -> str:
    return "reference" if name == "reference" else ("ours" if name in OURS else "anchor")


def never_timed(name: str, device_type: str):
    """Why a contestant is never timed on this device, or None: the "cuda" backend on CPU
    tensors is its emulator (CCAM_CUDA_EMULATE=1), a correctness tool, not a kernel to time."""
    if name == "cuda" and device_type != "cuda":
        return "the cuda backend on CPU tensors is its emulator (CCAM_CUDA_EMULATE=1), a correctness tool: never timed"
    return None


def default_contestants(bench: str, device: torch.device, *, explicit: bool = False) -> list[str]:
    """Every contestant that can run on this device: usable backends of ours and the anchors.
    By default only where "auto" would use our backend (so not Triton's CPU interpreter, a
    test tool); ``explicit`` lists every device the backend takes (what --backends accepts)."""
    names = PROJECTOR_CONTESTANTS if bench == "projector" else ATTENTION_CONTESTANTS
    out = []
    for name in names:
        if name in BACKENDS:
            if BACKENDS[name].refuses_placement(device.type, auto=not explicit) is None and not never_timed(name, device.type):
                out.append(name)
        elif name in SDPA_ANCHORS:
            if device.type in SDPA_ANCHORS[name][1]:
                out.append(name)
        else:
            out.append(name)
    return out


# -- inputs --------------------------------------------------------------------------------


class AttentionInputs:
    """``sets[i]`` = dict(q (N, H, D), k, v (L, Hkv, D), dout (B, N, H, D)), fresh random data."""

    def __init__(self, case, device, num_sets: int):
        cfg = case.config
        L = sum(case.frame_counts) * case.tokens_per_frame
        grad = case.pass_ != "fwd"

        def make(*shape):
            return torch.randn(*shape, device=device, dtype=case.dtype).requires_grad_(grad)

        self.case, self.device = case, device
        self.sets = [
            dict(q=make(cfg.num_query, cfg.num_heads, cfg.head_dim),
                 k=make(L, cfg.num_key_value_heads, cfg.head_dim),
                 v=make(L, cfg.num_key_value_heads, cfg.head_dim),
                 dout=torch.randn(len(case.frame_counts), cfg.num_query, cfg.num_heads, cfg.head_dim,
                                  device=device, dtype=case.dtype))
            for _ in range(num_sets)
        ]

    @staticmethod
    def bytes_per_set(case) -> int:
        cfg = case.config
        L = sum(case.frame_counts) * case.tokens_per_frame
        elems = (cfg.num_query * cfg.num_heads * cfg.head_dim * (1 + len(case.frame_counts))
                 + 2 * L * cfg.num_key_value_heads * cfg.head_dim)
        return elems * case.dtype.itemsize


    def upcast(self):
        """Set 0 in float32 (float64 stays): the inputs of the error anchor."""
        return _Upcast(self, [{name: _wider(x) for name, x in self.sets[0].items()}])


def _wider(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64):
        return x.detach().clone().requires_grad_(x.requires_grad)
    return x.detach().float().requires_grad_(x.requires_grad)


class _Upcast:
    def __init__(self, inputs, sets, module=None):
        wide = torch.float64 if inputs.case.dtype == torch.float64 else torch.float32
        self.case = dataclasses.replace(inputs.case, dtype=wide)
        self.device, self.sets = inputs.device, sets
        if module is not None:
            self.module = module


class ProjectorInputs:
    """One CCAMProjector (eval mode: dropout off) and ``sets[i]`` = dict(features (F, P, Cv),
    dout (B, N, output_size))."""

    def __init__(self, case, device, num_sets: int):
        cfg = case.config
        grad = case.pass_ != "fwd"
        self.case, self.device = case, device
        self.module = CCAMProjector(cfg).to(device=device, dtype=case.dtype).eval()
        frames = sum(case.frame_counts)
        self.sets = [
            dict(features=torch.randn(frames, case.tokens_per_frame, cfg.cross_hidden_size, device=device,
                                      dtype=case.dtype).requires_grad_(grad),
                 dout=torch.randn(len(case.frame_counts), cfg.num_query, cfg.output_size, device=device,
                                  dtype=case.dtype))
            for _ in range(num_sets)
        ]

    def upcast(self):
        """Set 0 and a copy of the module in float32 (float64 stays)."""
        module = copy.deepcopy(self.module)
        if self.case.dtype != torch.float64:
            module.float()
        return _Upcast(self, [{name: _wider(x) for name, x in self.sets[0].items()}], module)

    @staticmethod
    def bytes_per_set(case) -> int:
        cfg = case.config
        elems = (sum(case.frame_counts) * case.tokens_per_frame * cfg.cross_hidden_size
                 + len(case.frame_counts) * cfg.num_query * cfg.output_size)
        return elems * case.dtype.itemsize


# -- contestants ---------------------------------------------------------------------------


class Contestant:
    """One row's implementation. ``prepare`` builds native inputs (untimed) and raises
    Unsupported when the case is outside what it can do; ``forward(i)`` runs on set i, with
    attention dropout ``dropout_p`` (ours and the reference: the mask of docs/reference.md
    3.1.1; SDPA: its own)."""

    def __init__(self, name: str, dropout_p: float = 0.0):
        self.name, self.kind, self.dropout_p = name, kind_of(name), dropout_p
        self.compile_s = None  # wall time of the first call, for the compiled anchors

    def prepare(self, inputs) -> None:
        self.inputs = inputs

    def compile_note(self) -> str | None:
        """What its first call (after prepare) may compile, or None: the runner prints a line
        when such a call starts and when it ends."""
        return None

    def forward(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def leaves(self, i: int) -> list:
        raise NotImplementedError

    def dout(self, i: int) -> torch.Tensor:
        return self.inputs.sets[i]["dout"]

    def canonical(self, i: int, out: torch.Tensor, with_grads: bool) -> list:
        raise NotImplementedError

    def release(self) -> None:
        self.__dict__.pop("inputs", None)


class OursAttention(Contestant):
    def prepare(self, inputs):
        super().prepare(inputs)
        s, case = inputs.sets[0], inputs.case
        problem = check_attention_args(s["q"], s["k"], s["v"], case.frame_counts, case.tokens_per_frame, None,
                                       self.dropout_p)
        why = never_timed(self.name, s["q"].device.type) or BACKENDS[self.name].refuses(s["q"], problem)
        if why:
            raise Unsupported(why)

    def compile_note(self):
        return _TRITON_JIT if self.name == "triton" and self.inputs.device.type == "cuda" else None

    def forward(self, i):
        s, case = self.inputs.sets[i], self.inputs.case
        if self.name == "reference":
            return reference_formula(s["q"], s["k"], s["v"], case.frame_counts, case.tokens_per_frame,
                                     dropout_p=self.dropout_p)
        return ccam_attention(s["q"], s["k"], s["v"], case.frame_counts, case.tokens_per_frame,
                              dropout_p=self.dropout_p, backend=self.name)

    def leaves(self, i):
        s = self.inputs.sets[i]
        return [s["q"], s["k"], s["v"]]

    def canonical(self, i, out, with_grads):
        s = self.inputs.sets[i]
        return [out.detach()] + ([s["q"].grad, s["k"].grad, s["v"].grad] if with_grads else [])


class NativeLayoutAnchor(Contestant):
    """An anchor timed on its own layout: ``self.native[i]`` = dict(q, k, v, dout) built in
    prepare from set i, the leaves its gradients land in."""

    def leaves(self, i):
        n = self.native[i]
        return [n["q"], n["k"], n["v"]]

    def dout(self, i):
        return self.native[i]["dout"]

    def release(self):
        super().release()
        self.__dict__.pop("native", None)


class SdpaAnchor(NativeLayoutAnchor):
    """SDPA with the dense mask, padded batch (B, H, N, Lmax): what a user of SDPA writes.
    The mask is prepared once per case as the additive bias the kernels consume (0 where
    visible, -inf elsewhere and on padding), so the timed call is the kernel alone."""

    def prepare(self, inputs):
        super().prepare(inputs)
        from torch.nn.attention import SDPBackend

        member, devices = SDPA_ANCHORS[self.name]
        if inputs.device.type not in devices:
            raise Unsupported(f"SDPA's {member} backend takes a mask only on {', '.join(devices)}")
        self.backend = getattr(SDPBackend, member)
        case, cfg = inputs.case, inputs.case.config
        B, N, P = len(case.frame_counts), cfg.num_query, case.tokens_per_frame
        self.offsets = key_offsets(case.frame_counts, P)
        lmax = max(case.frame_counts) * P
        # Rows padded to a multiple of 16 elements: SDPA's kernels want aligned mask strides and
        # would otherwise copy the whole mask into an aligned buffer inside every timed call.
        stride = -(-lmax // 16) * 16
        bias = torch.full((B, 1, N, stride), float("-inf"), device=inputs.device, dtype=case.dtype)
        for b, t in enumerate(case.frame_counts):
            visible = dense_mask(N, t, P, device=inputs.device)
            bias[b, 0, :, : t * P].masked_fill_(visible, 0.0)
        self.bias = bias[..., :lmax]
        grad = case.pass_ != "fwd"
        self.native = []
        for s in inputs.sets:
            q = s["q"].detach().transpose(0, 1)[None].expand(B, -1, -1, -1).contiguous().requires_grad_(grad)
            k, v = (self._pad(s[x].detach(), lmax).requires_grad_(grad) for x in ("k", "v"))
            self.native.append(dict(q=q, k=k, v=v, dout=s["dout"].transpose(1, 2).contiguous()))

    def _pad(self, x, lmax):
        """Packed (L, Hkv, D) -> zero-padded (B, Hkv, Lmax, D)."""
        out = x.new_zeros(len(self.offsets) - 1, x.shape[1], lmax, x.shape[2])
        for b in range(len(self.offsets) - 1):
            lo, hi = self.offsets[b], self.offsets[b + 1]
            out[b, :, : hi - lo] = x[lo:hi].transpose(0, 1)
        return out

    def _unpad(self, x):
        return torch.cat([x[b, :, : self.offsets[b + 1] - self.offsets[b]].transpose(0, 1)
                          for b in range(len(self.offsets) - 1)])

    def forward(self, i):
        from torch.nn.attention import sdpa_kernel

        n = self.native[i]
        extra = {"enable_gqa": True} if n["q"].shape[1] != n["k"].shape[1] else {}
        with sdpa_kernel([self.backend]):
            return F.scaled_dot_product_attention(n["q"], n["k"], n["v"], attn_mask=self.bias,
                                                  dropout_p=self.dropout_p, **extra)

    def canonical(self, i, out, with_grads):
        res = [out.detach().transpose(1, 2)]
        if with_grads:
            n = self.native[i]
            res += [n["q"].grad.sum(0).transpose(0, 1), self._unpad(n["k"].grad), self._unpad(n["v"].grad)]
        return res

    def release(self):
        super().release()
        self.__dict__.pop("bias", None)


_FLEX = FlexCCAMAttention()  # one per process: block masks and compiled graphs are reused
FLEX_NO_DROPOUT = ("FlexAttention has no attention dropout: its score_mod and block mask act on the scores "
                   "before the softmax, and dropout zeroes probabilities after it")
_FLEX_COMPILE = "torch.compile of FlexAttention for this shape"
_TRITON_JIT = "Triton's JIT compile and autotuning"


class FlexAnchor(NativeLayoutAnchor):
    """Compiled FlexAttention on the packed layout (1, H, B*N, D) x (1, Hkv, L, D)."""

    def prepare(self, inputs):
        super().prepare(inputs)
        case, cfg = inputs.case, inputs.case.config
        B, N, H, D = len(case.frame_counts), cfg.num_query, cfg.num_heads, cfg.head_dim
        if self.dropout_p > 0:
            raise Unsupported(FLEX_NO_DROPOUT)
        if inputs.device.type == "cpu" and case.pass_ != "fwd":
            raise Unsupported("FlexAttention has no backward on CPU")
        self.mask = _FLEX.block_mask(N, case.frame_counts, case.tokens_per_frame, inputs.sets[0]["q"].device)
        grad = case.pass_ != "fwd"
        self.native = []
        for s in inputs.sets:
            q = s["q"].detach().transpose(0, 1)[:, None].expand(H, B, N, D).reshape(1, H, B * N, D)
            k, v = (native_keys(s[x].detach()).requires_grad_(grad) for x in ("k", "v"))
            dout = s["dout"].permute(2, 0, 1, 3).reshape(1, H, B * N, D)
            self.native.append(dict(q=q.contiguous().requires_grad_(grad), k=k, v=v, dout=dout))
        self.shape = (B, N, H, D)
        self.num_keys = inputs.sets[0]["k"].shape[0]  # the native keys are padded past it

    def compile_note(self):
        return _FLEX_COMPILE

    def forward(self, i):
        n = self.native[i]
        return _FLEX.native(n["q"], n["k"], n["v"], self.mask)

    def canonical(self, i, out, with_grads):
        B, N, H, D = self.shape
        res = [out.detach()[0].view(H, B, N, D).permute(1, 2, 0, 3)]
        if with_grads:
            n = self.native[i]
            res += [n["q"].grad[0].view(H, B, N, D).sum(1).transpose(0, 1),
                    n["k"].grad[0, :, :self.num_keys].transpose(0, 1),
                    n["v"].grad[0, :, :self.num_keys].transpose(0, 1)]
        return res


class ProjectorContestant(Contestant):
    """The shared CCAMProjector with its attention switched to this contestant's."""

    def prepare(self, inputs):
        super().prepare(inputs)
        if self.name == "flex":
            if inputs.device.type == "cpu" and inputs.case.pass_ != "fwd":
                raise Unsupported("FlexAttention has no backward on CPU")
            self.attention = _FLEX
        else:
            why = never_timed(self.name, inputs.device.type) or BACKENDS[self.name].refuses_placement(
                inputs.device.type, inputs.case.dtype)
            if why:
                raise Unsupported(why)
            self.attention = reference_formula if self.name == "reference" else self.name

    def compile_note(self):
        if self.name == "flex":
            return _FLEX_COMPILE
        return _TRITON_JIT if self.name == "triton" and self.inputs.device.type == "cuda" else None

    def forward(self, i):
        module = self.inputs.module
        module.backend = self.attention
        return module(self.inputs.sets[i]["features"], self.inputs.case.frame_counts)

    def leaves(self, i):
        return [self.inputs.sets[i]["features"], *self.inputs.module.parameters()]

    def canonical(self, i, out, with_grads):
        res = [out.detach()]
        if with_grads:
            m = self.inputs.module
            res += [self.inputs.sets[i]["features"].grad, m.query.grad, m.attn.k_proj.weight.grad]
        return res


def make_contestant(bench: str, name: str, dropout_p: float = 0.0) -> Contestant:
    """``dropout_p``: attention dropout of the attention bench (the projector bench times its
    module in eval mode: 0)."""
    if bench == "projector":
        if name not in PROJECTOR_CONTESTANTS:
            raise ValueError(f"the projector bench runs {list(PROJECTOR_CONTESTANTS)}, got {name!r}")
        if dropout_p:
            raise ValueError("the projector bench runs without dropout (its module in eval mode)")
        return ProjectorContestant(name)
    if name in BACKENDS:
        return OursAttention(name, dropout_p)
    if name in SDPA_ANCHORS:
        return SdpaAnchor(name, dropout_p)
    if name == "flex":
        return FlexAnchor(name, dropout_p)
    raise ValueError(f"unknown contestant {name!r}; known: {list(ATTENTION_CONTESTANTS)}")


def capture_reason(exc: BaseException, caught: list) -> str:
    """A one-paragraph reason from an exception and the warnings raised with it (SDPA explains
    why it refused a kernel in warnings, then raises a generic error)."""
    lines = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    head = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return "; ".join(dict.fromkeys([head, *lines]))[:500]


def error_anchor(bench: str, inputs, pass_: str, dropout_p: float = 0.0) -> list:
    """The reference's results on set 0, computed in float32 (float64 stays float64): what
    every row's max_rel_err is measured against, so that a low-precision row's error (the
    reference's own row included) is its distance from the math, not from another rounding.
    With dropout, call it after the torch.manual_seed that the checked calls follow too."""
    wide = inputs.upcast()
    anchor = make_contestant(bench, "reference", dropout_p)
    anchor.prepare(wide)
    try:
        return run_once(anchor, pass_)
    finally:
        anchor.release()


def run_once(contestant: Contestant, pass_: str):
    """One full call on set 0 (forward, and backward unless pass_ is "fwd"), in our layout."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for x in contestant.leaves(0):
                x.grad = None
            if pass_ == "fwd":
                with torch.no_grad():
                    out = contestant.forward(0)
            else:
                out = contestant.forward(0)
                out.backward(contestant.dout(0))
            return contestant.canonical(0, out, with_grads=pass_ != "fwd")
        except (torch.OutOfMemoryError, Unsupported):
            raise
        except (RuntimeError, NotImplementedError) as exc:
            if "No available kernel" in str(exc) or isinstance(exc, NotImplementedError):
                raise Unsupported(capture_reason(exc, caught)) from exc
            raise


def pass_functions(contestant: Contestant, pass_: str, num_sets: int):
    """(setup, run) for the timer: ``run`` is exactly the benchmarked pass on set i % num_sets."""
    held = {}

    def clear(i):
        for x in contestant.leaves(i % num_sets):
            x.grad = None

    if pass_ == "fwd":
        def setup(i):
            return None

        def run(i):
            with torch.no_grad():
                contestant.forward(i % num_sets)
    elif pass_ == "fwd+bwd":
        setup = clear

        def run(i):
            contestant.forward(i % num_sets).backward(contestant.dout(i % num_sets))
    elif pass_ == "bwd":
        def setup(i):
            clear(i)
            held["out"] = contestant.forward(i % num_sets)

        def run(i):
            held.pop("out").backward(contestant.dout(i % num_sets))
    else:
        raise ValueError(f"pass must be fwd, bwd or fwd+bwd, got {pass_!r}")
    return setup, run
