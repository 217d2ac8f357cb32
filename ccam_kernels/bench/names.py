"""The names the ccam-bench command line offers, without importing torch, so that
``ccam-bench --help`` answers at once. contestants.py and runner.py check at import that these
are the names they run (tests/test_bench_cli_inputs.py imports both)."""

BENCHES = ("attention", "projector")
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
OUR_BACKENDS = ("torch", "triton", "cuda")  # every backend of ccam_kernels.attention but "reference"
SDPA_NAMES = ("sdpa-efficient", "sdpa-cudnn", "sdpa-flash")
ATTENTION_CONTESTANTS = ("reference", *OUR_BACKENDS, *SDPA_NAMES, "flex")
PROJECTOR_CONTESTANTS = ("reference", *OUR_BACKENDS, "flex")
ALL_NAMES = tuple(dict.fromkeys(ATTENTION_CONTESTANTS + PROJECTOR_CONTESTANTS))
LONG = "long"  # --bench long: the long-video benchmark (bench/long_video.py), its own flags


def is_long_request(argv) -> bool:
    """Whether a ccam-bench command line asks for this bench (``--bench long``)."""
    for i, arg in enumerate(argv):
        if arg == "--bench" and i + 1 < len(argv) and argv[i + 1] == LONG:
            return True
        if arg == f"--bench={LONG}":
            return True
    return False
