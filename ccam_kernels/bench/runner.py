"""Running benchmark cases: every contestant on the same inputs, in interleaved rounds.

For each case: build the inputs (rotated copies), then per contestant prepare its native
inputs, run one checked call (error against the reference; for compiled anchors this call
compiles and its time is reported as compile_s; a line is printed when a compile starts and
when it ends), and warm up. Only then the timed rounds: round
1 of every contestant, round 2 of every contestant, ... so that a drift of the machine shows up
as spread between rounds rather than as a difference between backends.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass, field

import torch

from ..config import CCAMConfig
from .contestants import (
    AttentionInputs,
    ProjectorInputs,
    Unsupported,
    capture_reason,
    error_anchor,
    kind_of,
    make_contestant,
    pass_functions,
    run_once,
)
from .flops import attention_flops, dense_attention_flops, projector_flops, projector_gemm_flops
from .oom import is_oom
from .progress import Progress, Spent
from .timing import Timer, case_ceiling, gemm_tflops, measure_ceilings, noisy_reason, rotation_count, summarize, sync

from .names import BENCHES, PASSES  # noqa: E402  (torch-free, for the command line)


@dataclass(frozen=True)
class BenchCase:
    bench: str  # "attention" | "projector"
    pass_: str  # "fwd" | "bwd" | "fwd+bwd"
    frame_counts: tuple  # frames of each sample
    dtype: torch.dtype
    config: CCAMConfig = field(default_factory=CCAMConfig)
    tokens_per_frame: int = 729
    # Attention dropout (ccam-bench --dropout): each contestant runs with it and without it, in
    # the same interleaved rounds, and the dropout rows carry the cost (dropout_cost).
    dropout_p: float = 0.0

    @property
    def label(self) -> str:
        t = self.frame_counts
        frames = f"T={t[0]}" if len(set(t)) == 1 else f"T={list(t)}"
        dropout = f" dropout={self.dropout_p:g}" if self.dropout_p else ""
        return f"{self.bench} {self.pass_} {frames} B={len(t)} {str(self.dtype).replace('torch.', '')}{dropout}"

    @property
    def dropouts(self) -> tuple:
        """The dropout probabilities each contestant runs at: 0, and the case's when it has one."""
        return (0.0, self.dropout_p) if self.dropout_p else (0.0,)

    def flops(self) -> float:
        cfg = self.config
        if self.bench == "attention":
            return attention_flops(cfg.num_query, cfg.num_heads, cfg.head_dim, self.frame_counts,
                                   self.tokens_per_frame, self.pass_)
        return projector_flops(cfg, self.frame_counts, self.tokens_per_frame, self.pass_)

    # The work measures of the time-left estimate (progress.py).
    def attention_work(self, dense: bool) -> float:
        """The attention FLOPs of this case (the projector's attention too): live pairs only,
        or every pair of each sample for a backend that computes the dense masked scores."""
        cfg = self.config
        count = dense_attention_flops if dense else attention_flops
        return count(cfg.num_query, cfg.num_heads, cfg.head_dim, self.frame_counts, self.tokens_per_frame, self.pass_)

    def gemm_flops(self) -> float:
        """The projector's GEMM FLOPs; 0 for the attention bench."""
        if self.bench == "attention":
            return 0.0
        return projector_gemm_flops(self.config, self.frame_counts, self.tokens_per_frame, self.pass_)


@dataclass(frozen=True)
class Settings:
    warmup: int = 1  # untimed calls per contestant after the checked call
    repeats: int = 3  # timed calls per contestant per round (at most)
    rounds: int = 2  # interleaved timing rounds; their disagreement is the reported spread
    min_repeats: int = 3  # fewest timed calls per round when a time budget cuts repeats
    max_seconds: float | None = None  # time budget of the whole suite


_NOT_TIMED = dict(median_ms=None, min_ms=None, max_ms=None, iqr_ms=None, spread_pct=None, repeats=0,
                  tflops=None, pct_of_ceiling=None, peak_mem_mb=None, speedup_vs_reference=None,
                  speedup_vs_dense=None, dense_peer=None, speedup_vs_flex=None,
                  noisy=False, noisy_reason=None)


def _base_row(case: BenchCase, name: str, dropout_p: float = 0.0) -> dict:
    counts = list(case.frame_counts)
    return {
        "bench": case.bench, "pass": case.pass_, "backend": name, "kind": kind_of(name), "dropout_p": dropout_p,
        "no_dropout_ms": None, "dropout_cost": None,
        "frames": counts[0] if len(set(counts)) == 1 else counts, "frame_counts": counts,
        "batch": len(counts), "dtype": str(case.dtype).replace("torch.", ""), "gflop": case.flops() / 1e9,
        "status": "ok", "reason": None, "max_rel_err": None, "compile_s": None, **_NOT_TIMED,
        "ceiling_tflops": None, "ceiling_before_tflops": None, "ceiling_after_tflops": None, "ceiling_drift_pct": None,
    }


def _fail(row: dict, status: str, reason: str) -> dict:
    row.update(status=status, reason=reason, **_NOT_TIMED)
    return row


# A row whose error against the (float32) reference exceeds this is "wrong", not timed: a
# timing of a wrong answer is worth nothing. Loose on purpose: it catches garbage (NaN, a
# missed mask, a wrong gradient), while the tests hold the tight tolerances.
WRONG_ABOVE = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
_CHUNK = 1 << 24


def _rel_err(got: list, ref: list) -> float:
    """Largest ||x - ref|| / ||ref|| over the compared tensors; NaN if any is not finite.
    Sums of squares in float64 over chunks, so no float64 copy of a whole tensor is made."""
    worst = 0.0
    for x, r in zip(got, ref):
        x, r = x.reshape(-1), r.reshape(-1)
        diff2 = ref2 = 0.0
        for i in range(0, x.numel(), _CHUNK):
            xs, rs = x[i:i + _CHUNK].double(), r[i:i + _CHUNK].double()
            diff2 += float((xs - rs).square().sum())
            ref2 += float(rs.square().sum())
        err = (diff2 / max(ref2, 1e-300)) ** 0.5
        if err != err or err == float("inf"):
            return float("nan")
        worst = max(worst, err)
    return worst


class WrongResult(Exception):
    """A contestant's result is too far from the reference to be worth timing."""


class DeviceLost(RuntimeError):
    """The CUDA context is unusable (illegal memory access, device-side assert): no later
    case can run in this process."""


_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "CUDA error: misaligned")


def _check_sticky(exc: BaseException) -> None:
    if any(s in str(exc) for s in _STICKY):
        raise DeviceLost(str(exc).strip().splitlines()[0]) from exc


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            _check_sticky(exc)
            raise


def graphs_compiled() -> int | None:
    """How many graphs torch.compile has compiled in this process (None if unknown): tells a
    first call that compiled from one that found its graph cached."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


def _first_call(contestant, name: str, pass_: str, device, log, clock):
    """The checked call, with a line before and after it when it may compile (a compile can
    take seconds to minutes with nothing else printed). Returns (results, seconds)."""
    note = contestant.compile_note()
    if note:
        log(f" compiling: {note} ...")
        graphs = graphs_compiled()
    t0 = clock()
    try:
        got = run_once(contestant, pass_)
        sync(device)
    except BaseException:
        if note:  # the failure's own line follows, under the contestant's name
            log(f"  {name:<15} compile failed after {clock() - t0:.1f} s")
            log(f"  {name:<15}", end="")
        raise
    first_s = clock() - t0
    if note:
        new = None if graphs is None else graphs_compiled() - graphs
        cached = " (nothing new: its graph was compiled before)" if new == 0 else ""
        log(f"  {name:<15} compile done in {first_s:.1f} s{cached}")
        log(f"  {name:<15}", end="")
    return got, first_s


def run_case(case: BenchCase, names, timer: Timer, settings: Settings, ceilings: dict, log,
             budget_s: float | None = None, clock=time.perf_counter, spent: dict | None = None,
             gemm_rate=gemm_tflops) -> list[dict]:
    """Rows of one case, one per contestant; "reference" should come first (it anchors the
    error column). ``budget_s`` caps the time spent in timed calls by lowering repeats.
    ``spent`` (a dict) receives each contestant's calls and their wall time (progress.Spent),
    from which the time-left estimate is made. ``gemm_rate(device, dtype)`` measures the GEMM
    ceiling before and after the case (a "ceiling" entry of ``spent``)."""
    device = timer.device
    spent = {} if spent is None else spent
    t0 = clock()
    before = gemm_rate(device, case.dtype)
    spent.setdefault("ceiling", Spent()).add(1, clock() - t0)
    torch.manual_seed(zlib.crc32(case.label.encode()))  # fresh random data, the same in every run
    inputs_type = AttentionInputs if case.bench == "attention" else ProjectorInputs
    num_sets = rotation_count(inputs_type.bytes_per_set(case), device)
    try:
        inputs = inputs_type(case, device, num_sets)
    except Exception as exc:  # noqa: BLE001 - even the inputs can be too large
        if not is_oom(exc):
            raise
        _free(device)
        log(f"  inputs do not fit in memory: {exc}")
        return [_fail(_base_row(case, n, p), "oom", "the inputs do not fit in memory")
                for n in names for p in case.dropouts]

    rows, live, refs = [], [], {}
    for p in case.dropouts:
        try:
            t0 = clock()
            _seed_dropout(p)
            refs[p] = error_anchor(case.bench, inputs, case.pass_, p)
            sync(device)
            spent.setdefault("reference", Spent()).add(1, clock() - t0)  # one more reference call, in float32
        except Exception as exc:  # noqa: BLE001 - without a float32 reference, rows carry no error
            _check_sticky(exc)
            _free(device)
            log(f"  the float32 reference for the error column failed ({capture_reason(exc, [])}); "
                "errors are measured against the reference row instead")
    fallback = {p: p not in refs for p in case.dropouts}
    tolerance = WRONG_ABOVE.get(str(case.dtype).replace("torch.", ""), 1e-4)
    for name, p in ((n, p) for n in names for p in case.dropouts):
        row = _base_row(case, name, p)
        rows.append(row)
        contestant = make_contestant(case.bench, name, p)
        label = _label(name, p)
        log(f"  {label:<15}", end="")
        try:
            contestant.prepare(inputs)
            sync(device)
            _seed_dropout(p)
            got, first_s = _first_call(contestant, label, case.pass_, device, log, clock)
            if name == "reference" and fallback[p]:
                refs[p] = got
            ref = refs.get(p)
            # An anchor's dropout draws its own mask: its result is not comparable.
            comparable = ref is not None and not (p and contestant.kind == "anchor")
            row["max_rel_err"] = _rel_err(got, ref) if comparable else None
            del got
            if name == "flex":
                row["compile_s"] = first_s
            err = row["max_rel_err"]
            if err is not None and not err <= tolerance:
                raise WrongResult(f"WRONG: error {err:.2e} against the reference exceeds {tolerance:.0e}; not timed")
            setup, run = pass_functions(contestant, case.pass_, num_sets)
            est_ms = timer.estimate_ms(setup, run, 1, settings.warmup) if settings.warmup else first_s * 1e3
            spent.setdefault(label, Spent()).add(1 + settings.warmup, first_s + est_ms * 1e-3 * settings.warmup)
            live.append((contestant, row, setup, run, max(est_ms, 1e-3)))
            log(f" checked (err {row['max_rel_err'] if row['max_rel_err'] is not None else float('nan'):.1e}, "
                f"first call {first_s:.2f} s)")
        except (Unsupported, WrongResult) as exc:
            wrong = isinstance(exc, WrongResult)
            _fail(row, "wrong" if wrong else "unsupported", str(exc))
            contestant.release()
            log(f" {'' if wrong else 'unsupported: '}{exc}")
        except Exception as exc:  # noqa: BLE001 - one failing contestant must not end the suite
            _check_sticky(exc)
            contestant.release()
            _free(device)
            if is_oom(exc):
                _fail(row, "oom", "out of memory")
                log(" out of memory")
            else:
                _fail(row, "error", capture_reason(exc, []))
                log(f" ERROR {row['reason']}")

    per_call_budget_ms = None
    if budget_s is not None and live:
        per_call_budget_ms = budget_s * 1e3 / settings.rounds
    times = {id(c): [[] for _ in range(settings.rounds)] for c, *_ in live}
    peaks = {id(c): [] for c, *_ in live}
    call = settings.warmup + 1
    for r in range(settings.rounds):
        for contestant, row, setup, run, est_ms in live:
            if row["status"] != "ok":
                continue
            repeats = settings.repeats
            if per_call_budget_ms is not None:
                share = per_call_budget_ms / (len(live) * est_ms)
                repeats = max(min(settings.min_repeats, settings.repeats), min(settings.repeats, int(share)))
            done, t0 = 0, clock()
            try:
                for _ in range(repeats):
                    ms, peak = timer.call(setup, run, call)
                    call += 1
                    done += 1
                    times[id(contestant)][r].append(ms)
                    peaks[id(contestant)].append(peak)
            except Exception as exc:  # noqa: BLE001
                _check_sticky(exc)
                _free(device)
                if is_oom(exc):
                    _fail(row, "oom", "out of memory while timing")
                else:
                    _fail(row, "error", capture_reason(exc, []))
            spent.setdefault(_label(row["backend"], row["dropout_p"]), Spent()).add(done, clock() - t0, timed=True)

    t0 = clock()
    ceiling = case_ceiling(before, gemm_rate(device, case.dtype))
    spent["ceiling"].add(1, clock() - t0)
    rate = ceiling["ceiling_tflops"]
    log(f"  GEMM ceiling {before:.3g} -> {ceiling['ceiling_after_tflops']:.3g} TFLOP/s"
        f" ({ceiling['ceiling_drift_pct']:.0f}% apart)")
    flops = case.flops()
    for row in rows:
        row.update(ceiling)
    for contestant, row, *_ in live:
        if row["status"] == "ok":
            row.update(summarize(times[id(contestant)], peaks[id(contestant)]))
            row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
            row["pct_of_ceiling"] = 100.0 * row["tflops"] / rate
            row["noisy_reason"] = noisy_reason(row)
            row["noisy"] = row["noisy_reason"] is not None
            spread = f", spread {row['spread_pct']:.1f}%" if row["spread_pct"] is not None else ""
            noisy = f"  NOISY: {row['noisy_reason']}" if row["noisy"] else ""
            log(f"  {_label(row['backend'], row['dropout_p']):<15} {row['median_ms']:10.3f} ms  {row['tflops']:8.3f} TFLOP/s  "
                f"{row['pct_of_ceiling']:5.1f}% of ceiling  ({row['repeats']} calls{spread}){noisy}")
        contestant.release()
    add_speedups(rows)
    add_dropout_costs(rows)
    for row in rows:
        if case.bench == "projector":
            # The roofline floor: every GEMM and live attention FLOP at the case's GEMM rate.
            row["floor_ms"] = flops / (rate * 1e12) * 1e3
            row["x_floor"] = row["median_ms"] / row["floor_ms"] if row["median_ms"] else None
    del inputs, live
    _free(device)
    return rows


# The seed every dropout call of a case starts its checked call from: ours and the reference then
# draw the same dropout seed (ccam_attention and reference_formula draw it from torch's default
# generator), so the error column compares the same masks.
DROPOUT_CHECK_SEED = 1234


def _seed_dropout(p: float) -> None:
    if p:
        torch.manual_seed(DROPOUT_CHECK_SEED)


def _label(name: str, dropout_p: float) -> str:
    """A contestant's name in the log: with its dropout, when it has one."""
    return f"{name} p={dropout_p:g}" if dropout_p else name


def add_dropout_costs(rows: list[dict]) -> None:
    """The cost of dropout: on each timed dropout row, the same contestant's median without
    dropout in the same case (``no_dropout_ms``, timed in the same interleaved rounds) and the
    ratio of the two (``dropout_cost``: 1.25 = dropout adds 25%)."""
    plain = {r["backend"]: r["median_ms"] for r in rows if not r.get("dropout_p") and r.get("median_ms")}
    for row in rows:
        if row.get("dropout_p") and row.get("median_ms") and row["backend"] in plain:
            row["no_dropout_ms"] = plain[row["backend"]]
            row["dropout_cost"] = row["median_ms"] / plain[row["backend"]]


def dense_peer(rows: list[dict]) -> dict | None:
    """The fastest timed dense-mask peer of a case: the SDPA anchors (SDPA with the dense mask)
    where they ran, else the reference (the same SDPA call per sample, without an LSE)."""
    timed = [r for r in rows if r.get("median_ms")]
    peers = [r for r in timed if r["backend"].startswith("sdpa-")] or [r for r in timed if r["backend"] == "reference"]
    return min(peers, key=lambda r: r["median_ms"]) if peers else None


def add_speedups(rows: list[dict]) -> None:
    """The speed columns of one case's rows: against the fastest dense-mask peer
    (``speedup_vs_dense``, naming it in ``dense_peer``), against flex, and (demoted: the
    reference anchors the errors, not the speed) against the reference."""
    by_dropout = {}
    for row in rows:  # rows with dropout compare with rows with the same dropout
        by_dropout.setdefault(row.get("dropout_p") or 0.0, []).append(row)
    if len(by_dropout) > 1:
        for group in by_dropout.values():
            add_speedups(group)
        return
    peer = dense_peer(rows)
    flex_ms = next((r["median_ms"] for r in rows if r["backend"] == "flex"), None)
    ref_ms = next((r["median_ms"] for r in rows if r["backend"] == "reference"), None)
    for row in rows:
        ms = row.get("median_ms")
        if not ms:
            continue
        if peer is not None:
            row["speedup_vs_dense"], row["dense_peer"] = peer["median_ms"] / ms, peer["backend"]
        if flex_ms:
            row["speedup_vs_flex"] = flex_ms / ms
        if ref_ms:
            row["speedup_vs_reference"] = ref_ms / ms


def input_bytes(case: BenchCase, device: torch.device) -> int:
    """Bytes of a case's rotated input copies (what run_case builds)."""
    per_set = (AttentionInputs if case.bench == "attention" else ProjectorInputs).bytes_per_set(case)
    return per_set * rotation_count(per_set, device)


def _default_log(msg: str = "", end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def run_suite(cases, contestants, device, settings: Settings = Settings(), *, log=None, on_case=None,
              clock=time.perf_counter) -> dict:
    """Measure the ceilings, then every case. ``contestants`` maps a bench name to the
    contestant names to run (reference first). Returns {"ceilings", "rows", "settings", ...}.
    ``on_case(partial_result)`` is called after every case (ccam-bench writes the files then,
    so a run cut short still leaves every finished row on disk). Each case's progress line
    estimates the time left from the finished cases' measured times (progress.py)."""
    log = log or _default_log
    device = torch.device(device)
    t0 = clock()
    dtypes = sorted({c.dtype for c in cases}, key=str)
    log("measuring the machine's ceilings (GEMM rate per dtype, copy bandwidth) ...")
    ceilings = measure_ceilings(device, dtypes)
    rates = ", ".join(f"{k} {v:.2f}" for k, v in ceilings["matmul_tflops_by_dtype"].items())
    log(f"  GEMM TFLOP/s: {rates}; copy {ceilings['copy_gbps']:.1f} GB/s")
    timer = Timer(device)
    rows = []
    lost = None

    def result():
        return {
            "ceilings": ceilings,
            "rows": rows,
            "settings": {"warmup": settings.warmup, "repeats": settings.repeats, "rounds": settings.rounds,
                         "max_seconds": settings.max_seconds, "l2_flush": device.type == "cuda"},
            "elapsed_s": clock() - t0,
            "progress": progress.records,
            "complete": len({(r["bench"], r["pass"], tuple(r["frame_counts"]), r["dtype"]) for r in rows}) == len(cases),
        }

    progress = Progress(lambda case: input_bytes(case, device))
    for i, case in enumerate(cases):
        elapsed = clock() - t0
        names = contestants[case.bench]
        if lost:
            rows += [_fail(_base_row(case, n, p), "skipped", f"the CUDA context was lost earlier: {lost}")
                     for n in names for p in case.dropouts]
            if on_case is not None:
                on_case(result())
            continue
        budget = None
        if settings.max_seconds is not None:
            left = settings.max_seconds - elapsed
            if left <= 0:
                log(f"[{i + 1}/{len(cases)}] {case.label}: skipped, the time budget is spent")
                rows += [_fail(_base_row(case, n, p), "skipped", "time budget spent")
                         for n in names for p in case.dropouts]
                if on_case is not None:
                    on_case(result())
                continue
            # Timed calls get at most half of this case's share; checks and warm-ups take the rest.
            budget = 0.5 * left / (len(cases) - i)
        left = progress.seconds_left(cases[i:])
        log(f"[{i + 1}/{len(cases)}] {case.label}  (elapsed {elapsed:.0f} s{progress.note(cases[i:])})")
        case_t0, spent = clock(), {}
        try:
            case_rows = run_case(case, names, timer, settings, ceilings, log, budget, clock=clock, spent=spent)
            rows += case_rows
            rates = next(((r["ceiling_before_tflops"], r["ceiling_after_tflops"]) for r in case_rows
                          if r.get("ceiling_before_tflops")), ())
            progress.finished(case, clock() - case_t0, spent, rates, started=case_t0 - t0, left=left)
        except DeviceLost as exc:
            lost = str(exc)
            log(f"  THE CUDA CONTEXT IS LOST ({lost}); the remaining cases become skipped rows")
            rows += [_fail(_base_row(case, n, p), "error", f"CUDA context lost: {lost}")
                     for n in names for p in case.dropouts]
        if on_case is not None:
            on_case(result())
    return result()
