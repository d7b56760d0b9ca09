"""``rllsm prepare-data``: LLSM / LLS-SIM pairs → VSI-SR meta-training tasks and a fine-tuning set."""

from __future__ import annotations

import argparse
import json
import sys

from streamer.cli.options import add_optics_args, optics_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-data", help="cut LLSM/LLS-SIM pairs into VSI-SR training patches (tasks + fine-tuning set)",
        description="Preprocess cell pairs (deskew, background, GT Gaussian filter, [0,1] normalisation), cut "
                    "LLSM 7×p×p ↔ GT 3×1.5p×1.5p patches and store them as npz shards with an index.json. "
                    "Source: a folder <Structure>/<Cell>/{LLSM *.tif, gt.tif} or simulated cells.")
    p.add_argument("out", help="output folder (created)")
    from streamer.cli.paths import add_overwrite_arg

    add_overwrite_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-folder", metavar="DIR", help="root of <Structure>/<Cell>/ folders with gt.tif + LLSM tifs")
    src.add_argument("--synthetic", action="store_true", help="cells from the small built-in generator (fast)")
    src.add_argument("--simulator", action="store_true",
                     help="cells from the rLLSM simulator (tasks: structure × --photon-levels)")
    p.add_argument("--structures", default=None,
                   help="comma-separated structures used as meta tasks (default: all but the fine-tuning one)")
    p.add_argument("--finetune-structure", default=None,
                   help="structure whose cells form the fine-tuning set (default: none for folders, 'rings' "
                        "for --synthetic, 'puncta' for --simulator); 'none' to skip")
    p.add_argument("--deskew", action="store_true", help="deskew raw sample-scan stacks (uses the optics)")
    p.add_argument("--average-planes", type=int, default=1, metavar="N",
                   help="average N consecutive frames into one plane (3 for raw 3-phase lattice-SIM frames)")
    p.add_argument("--patch", type=int, default=64, help="LLSM patch size (GT is 1.5×) [64]")
    p.add_argument("--patches-per-task", type=int, default=3000)
    p.add_argument("--finetune-patches", type=int, default=500)
    p.add_argument("--val-cells", type=int, default=1)
    p.add_argument("--val-crop", type=int, default=128, help="largest LLSM y/x kept of a validation cell [128]")
    p.add_argument("--gt-sigma", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("--synthetic cells")
    g.add_argument("--cells", type=int, default=3, help="cells per structure [3]")
    g.add_argument("--planes", type=int, default=12)
    g.add_argument("--size", type=int, default=96, help="LLSM lateral size of a cell [96]")
    g.add_argument("--photons", type=float, default=300.0, help="--synthetic peak photons; --simulator: "
                   "photons of the fine-tuning cells [300 / 200]")
    g.add_argument("--photon-levels", default="100,400", help="--simulator: photon levels, one task each [100,400]")
    add_optics_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The folder must be usable before any work; an existing dataset is replaced only with --overwrite.
    from pathlib import Path

    from streamer.cli.paths import check_output_dir

    check_output_dir(Path(args.out), ("index.json",), overwrite=args.overwrite)
    from pathlib import Path

    from pydantic import ValidationError

    from engines.config import describe_validation_error
    from engines.training.data import TrainingDataError
    from engines.training.prepare import (
        PrepareConfig,
        SimulatorSource,
        SyntheticSource,
        prepare_folder,
        prepare_simulator,
        prepare_synthetic,
    )
    from streamer.cli import CLIError

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    structures = [s for s in args.structures.split(",") if s] if args.structures else None
    ft = args.finetune_structure
    if ft is not None and ft.lower() == "none":
        ft = ""
    try:
        cfg = PrepareConfig(patch=args.patch, patches_per_task=args.patches_per_task,
                            finetune_patches=args.finetune_patches, val_cells=args.val_cells,
                            val_crop=args.val_crop, gt_sigma=args.gt_sigma, seed=args.seed)
        if args.synthetic:
            kw = {} if structures is None else {"task_structures": tuple(structures)}
            src = SyntheticSource(finetune_structure=("rings" if ft is None else ft) or None,
                                  cells_per_structure=args.cells, planes=args.planes, size=args.size,
                                  photons=args.photons, **kw)
            index = prepare_synthetic(Path(args.out), cfg, src, progress=say)
        elif args.simulator:
            kw = {} if structures is None else {"task_structures": tuple(structures)}
            levels = tuple(float(v) for v in args.photon_levels.split(",") if v.strip())
            src = SimulatorSource(finetune_structure=("puncta" if ft is None else ft) or None,
                                  photon_levels=levels, cells_per_structure=args.cells, planes=args.planes,
                                  size=args.size, finetune_photons=200.0 if args.photons == 300.0 else args.photons,
                                  **kw)
            index = prepare_simulator(Path(args.out), cfg, src, progress=say)
        else:
            index = prepare_folder(Path(args.from_folder), Path(args.out), cfg, optics_from_args(args),
                                   deskew=args.deskew, average_planes=args.average_planes,
                                   finetune_structure=ft or None, meta_structures=structures, progress=say)
    except ValidationError as err:
        raise CLIError(describe_validation_error(err, "prepare-data settings")) from None
    except (TrainingDataError, ValueError) as err:
        raise CLIError(str(err)) from None
    summary = {"out": args.out, "tasks": {k: v["count"] for k, v in index["tasks"].items()}}
    if "finetune" in index:
        summary["finetune"] = {"structure": index["finetune"]["structure"],
                               "train_patches": index["finetune"]["train"]["count"],
                               "val_cells": index["finetune"]["val"]["cells"]}
    print(json.dumps(summary))
    return 0
