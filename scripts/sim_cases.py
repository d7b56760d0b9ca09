"""The simulated cases a benchmark runs over: one ``--shape``, ``--structures`` and ``--seeds`` block for all."""

from __future__ import annotations

import argparse
from collections.abc import Iterator


def add_case_args(ap: argparse.ArgumentParser, shape: str = "101,256,256", structures: str = "beads,filaments",
                  seeds: str = "0,1,2") -> None:
    """Add ``--shape Z,Y,X``, ``--structures a,b`` and ``--seeds 0,1`` with these defaults."""
    ap.add_argument("--shape", default=shape, help=f"raw stack Z,Y,X (default {shape})")
    ap.add_argument("--structures", default=structures, help=f"simulated structures (default {structures})")
    ap.add_argument("--seeds", default=seeds, help=f"simulation seeds (default {seeds})")


def shape_of(args: argparse.Namespace) -> tuple[int, int, int]:
    """The raw stack shape ``--shape`` asks for."""
    z, y, x = (int(s) for s in args.shape.split(","))
    return z, y, x


def cases(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """Every (structure, seed) pair, structure by structure."""
    for structure in args.structures.split(","):
        for seed in args.seeds.split(","):
            yield structure, int(seed)
