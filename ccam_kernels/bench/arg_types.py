"""argparse types shared by ccam-bench and ccam-bench --bench long: a bad value is refused while
the command line is parsed (exit code 2), before any case runs."""

from __future__ import annotations

import argparse


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers, each >= 1."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def int_at_least(minimum: int):
    """One integer >= minimum."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)
    return parse
