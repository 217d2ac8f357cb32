"""Attention dropout: the mask's one definition (ccam_kernels/dropout.py) and its copies in
Triton and CUDA agree bit for bit; its statistics; every backend applies it the same way."""

import math
import shutil
import subprocess

import pytest
import torch

from ccam_kernels import dropout
from ccam_kernels.dropout import keep_mask, keep_mask_at, philox4x32_10, threshold


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    cases = [((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for args, expected in cases:
        assert tuple(int(w) for w in philox4x32_10(*args)) == expected


def test_block_equals_elementwise_definition():
    """keep_mask (one Philox call per 8 keys, for a block) == keep_mask_at (per element)."""
    seed = int(torch.randint(0, 2**62, ()))
    heads, rows = torch.tensor([[0], [3]]), torch.arange(7, 20)[None]
    block = keep_mask(seed, 5, 2, heads, rows, 13, 61, 4, 0.3)
    elem = keep_mask_at(seed, 5, 2, heads[..., None], rows[..., None], torch.arange(13, 61), 4, 0.3)
    assert block.shape == (2, 13, 48) and torch.equal(block, elem)


def test_threshold():
    assert threshold(0.0) == 0 and threshold(0.5) == 32768 and threshold(0.1) == 6554
    for p in (0.1, 0.25, 0.9, 1e-6):
        assert 0 <= threshold(p) / 65536 - p < 2**-16
    with pytest.raises(ValueError):
        threshold(1.0)


def test_keep_rate_within_4_sigma():
    """10^6 draws (4 heads x 250 rows x 1000 keys) at several p."""
    for p in (0.1, 0.5, 0.9):
        keep = keep_mask(torch.randint(0, 2**62, ()), 0, 1, torch.arange(4)[:, None], torch.arange(250)[None],
                         0, 1000, 4, p)
        n = keep.numel()
        q = 1 - threshold(p) / 65536
        assert n == 10**6 and abs(keep.double().mean().item() - q) < 4 * math.sqrt(q * (1 - q) / n)


def test_independent_across_heads_rows_samples_calls():
    """Masks of different heads, rows, samples, offsets and seeds agree on about (1-p)^2 + p^2
    of the positions (independent), never all; the correlation of their draws is ~0."""
    p, n = 0.5, 200_000
    seed = int(torch.randint(0, 2**62, ()))
    base = keep_mask(seed, 0, 0, torch.tensor([[0]]), torch.arange(200)[None], 0, 1000, 8, p).flatten()
    others = [keep_mask(seed, 0, 0, torch.tensor([[1]]), torch.arange(200)[None], 0, 1000, 8, p),  # head
              keep_mask(seed, 0, 0, torch.tensor([[0]]), torch.arange(1, 201)[None], 0, 1000, 8, p),  # row
              keep_mask(seed, 0, 1, torch.tensor([[0]]), torch.arange(200)[None], 0, 1000, 8, p),  # sample
              keep_mask(seed, 1, 0, torch.tensor([[0]]), torch.arange(200)[None], 0, 1000, 8, p),  # offset
              keep_mask(seed + 1, 0, 0, torch.tensor([[0]]), torch.arange(200)[None], 0, 1000, 8, p),  # seed
              keep_mask(seed, 0, 0, torch.tensor([[0]]), torch.arange(200)[None], 1, 1001, 8, p)]  # key
    for other in others:
        a, b = base.double() * 2 - 1, other.flatten().double() * 2 - 1
        corr = (a * b).mean().item()
        assert abs(corr) < 4 / math.sqrt(n), corr


def test_triton_helper_matches_definition():
    pytest.importorskip("triton", reason="triton is not installed")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and Triton not interpreting")
    from ccam_kernels.backends.triton_dropout import keep_block

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for p, offset in ((0.1, 0), (0.7, 12345)):
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
        got = keep_block(seed, offset, 3 * 4 + 2, 37, 11, threshold(p), 16, 64).bool()
        want = keep_mask(seed, offset, 3, 2, torch.arange(37, 53, device=device), 11, 75, 4, p)
        assert torch.equal(got, want)


@pytest.fixture(scope="module")
def mask_program(tmp_path_factory):
    """csrc/emu/dropout_mask_main.cpp built with g++ as the emulation build sees the header."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    from ccam_kernels.cuda_build import csrc_dir

    root = csrc_dir()
    exe = tmp_path_factory.mktemp("dropout") / "dropout_mask_main"
    subprocess.run(["g++", "-std=c++17", "-O1", "-DCCAM_EMULATE", f"-I{root}", str(root / "emu" / "dropout_mask_main.cpp"),
                    "-o", str(exe)], check=True)
    return exe


def test_cuda_header_matches_definition(mask_program):
    for p, offset, key0 in ((0.1, 0, 0), (0.6, 7, 9), (0.05, 2**32 - 1, 2**33 + 5)):
        seed = int(torch.randint(0, 2**63 - 1, ()))
        out = subprocess.run([str(mask_program), str(seed), str(offset), "2", "5", "6", "3", str(key0),
                              str(threshold(p)), "9", "70"], check=True, capture_output=True, text=True).stdout
        got = torch.tensor([[c == "1" for c in line] for line in out.split()])
        want = keep_mask(seed, offset, 2, 5, torch.arange(3, 12), key0, key0 + 70, 6, p)
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Backends: every one applies the same mask (the same seed gives the same numbers).

from ccam_kernels.attention import resolve_backend  # noqa: E402
from ccam_kernels.checks import check_attention_args  # noqa: E402
from conftest import rel_err  # noqa: E402
from oracle import attention_oracle, oracle_visibility  # noqa: E402

# (N, H, Hkv, D, frame counts, P, shared q): ragged GQA, T not dividing N, T > N, T = 1
SHAPES = [(13, 4, 2, 16, (3, 5, 1), 3, False), (9, 2, 1, 16, (11,), 2, True), (7, 2, 2, 16, (2, 1), 4, True)]


def run_seeded(backend, q, k, v, counts, P, p, seed, variant=""):
    """``backend``'s op with an explicit seed (ccam_attention draws one per call)."""
    problem = check_attention_args(q, k, v, list(counts), P, None, p)
    return resolve_backend(backend, q, problem).run(q, k, v, problem, seed=torch.tensor(seed, dtype=torch.int64, device=q.device),
                                 variant=variant)


def dropout_oracle(q, k, v, counts, P, p, seed):
    """docs/reference.md's dropout in float64, written from its formula: the oracle's softmax
    probabilities times keep_mask / (1 - p) at every (sample, head, row, key)."""
    q64, k64, v64 = (x.double() for x in (q, k, v))
    N, H, D = q64.shape[-3:]
    kv = torch.arange(H) // (H // k64.shape[1])
    outs, start = [], 0
    for b, t in enumerate(counts):
        kb, vb = k64[start:start + t * P][:, kv], v64[start:start + t * P][:, kv]
        start += t * P
        qb = q64 if q64.dim() == 3 else q64[b]
        s = torch.einsum("nhd,lhd->hnl", qb, kb) / math.sqrt(D)
        probs = torch.softmax(s.masked_fill(~oracle_visibility(N, t, P), float("-inf")), -1)
        keep = keep_mask(seed, 0, b, torch.arange(H)[:, None], torch.arange(N)[None], 0, t * P, H, p)
        outs.append(torch.einsum("hnl,lhd->nhd", probs * keep.double() / (1 - p), vb))
    return torch.stack(outs)


def _inputs(N, H, Hkv, D, counts, P, shared, dtype=torch.float64, device="cpu"):
    L, B = sum(counts) * P, len(counts)
    q = torch.randn(*(() if shared else (B,)), N, H, D, dtype=torch.float64)
    k, v = torch.randn(L, Hkv, D, dtype=torch.float64), torch.randn(L, Hkv, D, dtype=torch.float64)
    dout = torch.randn(B, N, H, D, dtype=torch.float64)
    return [x.to(device, dtype) for x in (q, k, v, dout)]


@pytest.mark.parametrize("backend,variant", [("reference", ""), ("torch", "explicit"), ("torch", "")])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_backends_match_dropout_oracle(backend, variant, shape):
    """Output and every gradient of reference and torch vs autograd through the oracle, at
    float64 precision: the mask, its 1 / (1 - p) scale in float64 (issue 21.4), its recomputation."""
    q, k, v, dout = _inputs(*shape)
    counts, P, p, seed = shape[4], shape[5], 0.3, int(torch.randint(0, 2**62, ()))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = run_seeded(backend, q, k, v, counts, P, p, seed, variant)
    want = dropout_oracle(q, k, v, counts, P, p, seed)
    assert rel_err(out, want) < 1e-12
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q, k, v), dout)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-12
    plain = attention_oracle(q, k, v, counts, P)
    assert rel_err(out, plain) > 0.05, "dropout must change the output"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_explicit_engine_in_row_chunks_matches_dropout_oracle(monkeypatch, shape):
    """The explicit engine with tiles of a few rows (many chunks per block, GQA chunks of whole
    queries): output and gradients as autograd through the oracle, with dropout and without."""
    from ccam_kernels.backends import torch_prefix

    monkeypatch.setattr(torch_prefix, "EXPLICIT_TILE_ELEMENTS", 40)
    assert len(torch_prefix._row_chunks(12, 2, 7, 2)) == 6
    q, k, v, dout = _inputs(*shape)
    counts, P, seed = shape[4], shape[5], int(torch.randint(0, 2**62, ()))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    for p in (0.3, 0.0):
        out = run_seeded("torch", q, k, v, counts, P, p, seed, "explicit")
        want = dropout_oracle(q, k, v, counts, P, p, seed) if p else attention_oracle(q, k, v, counts, P)
        assert rel_err(out, want) < 1e-12
        for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
            assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64_fixed_seed(backend):
    q, k, v, _ = _inputs(5, 2, 1, 16, (3, 2), 2, False)
    seed = int(torch.randint(0, 2**62, ()))
    fn = lambda q, k, v: run_seeded(backend, q, k, v, (3, 2), 2, 0.4, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (q, k, v)), fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_masked_keys_never_kept(backend):
    """Keys a row cannot see stay out of its output with dropout on: changing them (to huge
    values) leaves every row that cannot see them bitwise unchanged."""
    N, P, T = 9, 3, 4
    q, k, v, _ = _inputs(N, 2, 2, 16, (T,), P, True, torch.float32)
    seed = int(torch.randint(0, 2**62, ()))
    base = run_seeded(backend, q, k, v, (T,), P, 0.5, seed)
    k2, v2 = k.clone(), v.clone()
    k2[(T - 1) * P:], v2[(T - 1) * P:] = 1e4, 1e4  # the last frame
    moved = run_seeded(backend, q, k2, v2, (T,), P, 0.5, seed)
    blind = (torch.arange(N) * T) // N < T - 1  # rows that do not see the last frame
    assert blind.any() and torch.equal(base[:, blind], moved[:, blind])
    assert not torch.equal(base[:, ~blind], moved[:, ~blind])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dropout_p0_is_bitwise_no_dropout(backend):
    q, k, v, _ = _inputs(*SHAPES[0][:-1], False, torch.float32)
    plain = run_seeded(backend, q, k, v, SHAPES[0][4], 3, 0.0, 5)
    from ccam_kernels import ccam_attention

    assert torch.equal(plain, ccam_attention(q, k, v, list(SHAPES[0][4]), 3, backend=backend))


def test_seed_from_default_generator():
    """ccam_attention draws its seed from torch's generator: torch.manual_seed reproduces the
    masks, and the next call draws new ones."""
    from ccam_kernels import ccam_attention

    q, k, v, _ = _inputs(9, 2, 1, 16, (3,), 2, True, torch.float32)
    torch.manual_seed(7)
    a, b = (ccam_attention(q, k, v, [3], 2, dropout_p=0.5, backend="torch") for _ in range(2))
    torch.manual_seed(7)
    assert torch.equal(a, ccam_attention(q, k, v, [3], 2, dropout_p=0.5, backend="torch")) and not torch.equal(a, b)


def test_seed_under_torch_compile_is_a_draw_in_the_graph():
    """Under torch.compile the per-call seed is a random op of the graph (aten.randint on the
    default generator), not a constant: two calls of one compiled graph give different masks
    without a recompile, torch.manual_seed reproduces them, and they are eager's masks."""
    from torch._dynamo.utils import counters

    from ccam_kernels import ccam_attention

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):  # dynamo's graph, run as traced
        graphs.append(gm)
        return gm.forward

    q, k, v, _ = _inputs(9, 2, 1, 16, (4,), 3, True, torch.float32)

    def f(q, k, v):
        return ccam_attention(q, k, v, [4], 3, dropout_p=0.5, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    torch.manual_seed(11)
    a, b = compiled(q, k, v), compiled(q, k, v)
    torch.manual_seed(11)
    again = compiled(q, k, v)
    torch.manual_seed(11)
    eager = f(q, k, v)
    assert not torch.equal(a, b) and torch.equal(a, again) and torch.equal(a, eager)
    assert len(graphs) == 1 and counters["stats"]["unique_graphs"] == 1  # no recompile
    assert "randint" in graphs[0].code  # the draw is traced, per call
