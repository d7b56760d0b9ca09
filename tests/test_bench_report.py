"""``rllsm bench --report DIR`` works without a GPU: it says so, and measures the CPU at the size asked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report; the GPU report is the real run")
def test_report_on_cpu_says_no_gpu_and_measures_the_chain(tmp_path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "bench", "--report", str(out), "--size", "16x40x40", "--modes", "classical",
         "--repeats", "1", "--live-stacks", "1", "--no-tests", "--budget-s", "240"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no GPU" in proc.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["gpu"] is False and "no GPU" in rep["note"] and rep["size"] == [16, 40, 40]
    assert rep["peak_tflops"]["fp32"] > 0
    (row,) = rep["timings"]
    assert row["mode"] == "classical" and row["raw_shape"] == [16, 40, 40]
    assert set(row["steps_s"]) == {"preprocess", "lateral_sr", "split_views", "fuse"}
    assert 0 < row["end_to_end_s"] and row["volumes_per_s"] == pytest.approx(1 / row["end_to_end_s"], rel=1e-3)
    # device-resident: the stack went to the device once and the fused volume came back once
    assert (row["transfers"]["h2d"], row["transfers"]["d2h"]) == (1, 1)
    (live,) = rep["live"]
    assert live["stacks_published"] == live["stacks_sent"] == 1 and not live["errors"]
    assert live["latency_last_plane_to_published_s"]["median"] > 0 and live["sustained_volumes_per_s"] > 0
    assert rep["parity"][0]["status"].startswith("no GPU")
    md = (out / "report.md").read_text()
    assert "no GPU" in md and "| classical | fp32 |" in md and "3.1 MFLOP" in md and "2.45 MFLOP" in md


def test_report_refuses_bad_arguments_in_one_line(tmp_path) -> None:
    for extra, text in ((["--modes", "turbo"], "unknown mode/precision ['turbo']"),
                        (["--size", "10x20"], "--size needs Z×Y×X"),
                        (["--live-stacks", "0"], "--live-stacks must be ≥ 1")):
        proc = subprocess.run([sys.executable, "-m", "streamer", "bench", "--report", str(tmp_path / "r"), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and text in proc.stderr, (extra, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr
