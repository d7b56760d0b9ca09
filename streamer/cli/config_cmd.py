"""``rllsm config``: print the resolved optical configuration (file + flags) as YAML or JSON."""

from __future__ import annotations

import argparse
import json

import yaml

from streamer.cli.options import add_optics_args, optics_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved optics/acquisition configuration")
    add_optics_args(p)
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = optics_from_args(args)
    data = cfg.model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.format == "json" else yaml.safe_dump(data, sort_keys=False), end="")
    return 0
