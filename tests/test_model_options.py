"""serve and replay take the model sources reconstruct takes: the same flags, from one model, reaching the chain."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest

from engines.sources import ReconSources
from streamer.cli import build_parser
from streamer.cli.model_options import add_model_args, sources_from_args

MODEL_FLAGS = {"--checkpoint", "--otf-dir", "--model", "--psf", "--psf-voxel-um", "--psf-a", "--psf-b"}


def _actions(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s: a for a in sub.choices[command]._actions for s in a.option_strings}


def test_serve_and_replay_take_reconstructs_model_flags_with_the_same_meaning() -> None:
    rec = _actions("reconstruct")
    assert MODEL_FLAGS <= set(rec)
    for command in ("serve", "replay"):
        acts = _actions(command)
        assert MODEL_FLAGS | {"--weights"} <= set(acts), command
        for flag in MODEL_FLAGS:
            a, b = acts[flag], rec[flag]
            assert (a.nargs, a.type, a.default, a.help) == (b.nargs, b.type, b.default, b.help), (command, flag)


def test_flags_are_generated_from_the_model_fields() -> None:
    p = argparse.ArgumentParser()
    add_model_args(p)
    flags = {s for a in p._actions for s in a.option_strings} - {"-h", "--help"}
    want = {(ReconSources.model_fields[n].json_schema_extra or {})["flag"] for n in ReconSources.model_fields
            if n != "version"}
    assert flags == want
    args = p.parse_args(["--psf-voxel-um", "0.1", "0.06", "0.06"])
    assert sources_from_args(args) == ReconSources(psf_voxel_um=(0.1, 0.06, 0.06))


def test_bad_sources_are_one_line_errors(tmp_path) -> None:
    from streamer.cli import CLIError

    p = argparse.ArgumentParser()
    add_model_args(p)
    for argv, match in ((["--checkpoint", str(tmp_path / "missing.pth")], "no such file"),
                        (["--psf-a", __file__], "--psf-b"),
                        (["--psf-voxel-um", "0", "1", "1"], "positive")):
        with pytest.raises(CLIError, match=match):
            sources_from_args(p.parse_args(argv))


@pytest.mark.slow
def test_replay_offline_runs_the_checkpoint_given_and_says_so_in_the_dataset(tmp_path) -> None:
    """--checkpoint reaches the stage chain: the dataset names that very file with its SHA-256, at 61.7 nm."""
    import zarr

    from engines.simulate import Microscope
    from engines.simulate.config import make_sim_config
    from engines.weights import demo_weights_path
    from streamer import wire
    from streamer.cli import main
    from streamer.recording import RecordingWriter
    from streaming_util import start_msg

    try:
        ckpt = tmp_path / "my-vsisr.pt"
        ckpt.write_bytes(open(demo_weights_path("vsi-sr"), "rb").read())
    except (FileNotFoundError, KeyError, ValueError):
        pytest.skip("no demo VSI-SR weights installed")
    sim = make_sim_config(shape=(16, 32, 32))
    raw = Microscope(sim, seed=0).acquire(0, with_ground_truth=False).raw
    with RecordingWriter(tmp_path / "rec") as w:
        w.append(start_msg("ck", raw.shape[0], raw.shape[1:], optics=sim.optics, n_timepoints=1), 1.0)
        w.append(wire.encode(wire.pixels_header(raw, acquisition_id="ck", seq=1, timepoint=0), raw), 1.1)
    out = tmp_path / "out"
    assert main(["replay", str(tmp_path / "rec"), "--offline", "--out", str(out), "--format", "zarr",
                 "--mode", "sr-rl", "--device", "cpu", "--checkpoint", str(ckpt)]) == 0
    doc = json.loads((out / "ck.ome.zarr" / "zarr.json").read_text())["attributes"]
    prov = doc["rllsm"]["provenance"]
    assert prov["mode"] == "sr-rl"
    assert prov["models"]["checkpoint"] == {"path": str(ckpt), "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    scale = doc["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert np.allclose(scale[2:], sim.optics.pixel_size_um / 1.5)
    assert zarr.open_group(out / "ck.ome.zarr", mode="r")["0"][0, 0].any()
