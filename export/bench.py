"""``rllsm bench``: per-step and end-to-end latency/throughput of the networks on each backend, side by side.

Everything compared is measured in one run, interleaved (backend A, B, A, B, …) so that a noisy neighbour slows
all of them alike; the table reports medians, achieved TFLOP/s (FLOPs counted by ``torch.utils.flop_counter``
on the torch module) and that figure as a fraction of the device's peak measured in the same run (the faster of a large matmul and a 3×3 convolution).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.backends.base import Backend
from engines.backends.manifest import Precision, ShapeRange
from engines.backends.models import get_model
from engines.backends.select import BackendConfig, BackendName, make_backend
from engines.backends.torch_backend import torch_dtype


@dataclass
class Row:
    """One measured (step, backend) pair."""

    step: str
    backend: str
    items: str
    n_items: int
    times_s: list[float] = field(default_factory=list)
    flops: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def throughput(self) -> float:
        return self.n_items / self.median_s

    def tflops(self) -> float | None:
        return None if self.flops is None else self.flops / self.median_s / 1e12


@dataclass
class BenchResult:
    device: str
    threads: int
    peak_tflops: float
    peak_desc: str
    rows: list[Row]

    def table(self) -> str:
        """Markdown table plus the backend ratios per step."""
        lines = [f"device: {self.device}; threads: {self.threads}; peak measured in this run: "
                 f"{_rate(self.peak_tflops)} ({self.peak_desc})", "",
                 "| step | backend | median latency | throughput | achieved | of peak |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            tf = r.tflops()
            lines.append(f"| {r.step} | {r.backend} | {r.median_s * 1e3:.1f} ms | {r.throughput:.2f} {r.items}/s | "
                         + (f"{_rate(tf)} | {tf / self.peak_tflops:.0%} |" if tf else "– | – |"))
        lines.append("")
        for step in dict.fromkeys(r.step for r in self.rows):
            rows = [r for r in self.rows if r.step == step]
            if len(rows) > 1:
                base = rows[0]
                ratios = ", ".join(f"{r.backend} {base.median_s / r.median_s:.2f}× as fast as {base.backend}"
                                   for r in rows[1:])
                lines.append(f"- {step}: {ratios}")
        return "\n".join(lines)


def _rate(tflops: float) -> str:
    return f"{tflops:.2f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_probe(device: torch.device, precision: Precision, n: int | None = None) -> tuple[Row, Callable[[], Any]]:
    """A square matmul timed among the network runs: the device peak under the same load as the networks.

    On a shared machine a separate peak measurement taken at a quiet moment would make the networks look worse
    (or better than 100 %); interleaving the probe with every round keeps numerator and denominator comparable.
    The size is the fastest of a few (BLAS libraries peak at different sizes; MKL on AMD CPUs drops off above
    512, GPUs need 4096+) unless *n* is given.
    """
    dtype = torch_dtype(precision)
    if n is None:
        sizes = (4096, 8192) if device.type == "cuda" else (512, 1024, 2048)
        rates = {}
        for size in sizes:
            a = torch.rand(size, size, device=device, dtype=dtype)
            torch.mm(a, a)
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, a)
            _sync(device)
            rates[size] = size**3 / (time.perf_counter() - t)
        n = max(rates, key=rates.get)
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    reps = max(1, int(4e9 // (2 * n**3)))  # ~4 GFLOP per sample, so one preemption does not dominate it

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    row = Row(f"peak probe ({reps}× {n}×{n} {precision.value} torch.mm)", f"torch {device}", "matmuls", reps,
              flops=2.0 * n**3 * reps)
    return row, run


def conv_probe(device: torch.device, precision: Precision) -> tuple[Row, Callable[[], Any]]:
    """A 64→64-channel 3×3 convolution, the networks' own dominant operation, timed like :func:`matmul_probe`.

    On CPUs the convolution library (oneDNN) can run 3×3 convolutions at twice the BLAS matmul rate, so a
    matmul-only peak would let the networks exceed "100 % of peak"; the peak is the faster of the two probes.
    """
    dtype = torch_dtype(precision)
    side = 512 if device.type == "cuda" else 128
    batch = 8 if device.type == "cuda" else 1
    x = torch.rand(batch, 64, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    flops_one = 2.0 * 64 * 64 * 9 * side * side * batch
    reps = max(1, int(4e9 // flops_one))

    def run() -> None:
        with torch.inference_mode():
            for _ in range(reps):
                conv(x)

    row = Row(f"peak probe ({reps}× 3×3 conv 64→64 on {batch}×{side}×{side} {precision.value})", f"torch {device}",
              "convs", reps, flops=flops_one * reps)
    return row, run


def count_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one forward pass (``torch.utils.flop_counter``; a multiply-add counts 2).

    Counted on the ``meta`` device — shapes only, no arithmetic — so counting a full-size volume is free.
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(module).to("meta")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        meta(*(torch.empty(tuple(x.shape), dtype=x.dtype, device="meta") for x in inputs))
    return float(counter.get_total_flops())


def _interleaved(rows_fns: Sequence[tuple[Row, Callable[[], Any]]], repeats: int, warmup: int,
                 device: torch.device) -> None:
    for _, fn in rows_fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    for _ in range(repeats):
        for row, fn in rows_fns:
            t = time.perf_counter()
            fn()
            _sync(device)
            row.times_s.append(time.perf_counter() - t)


def _open_backends(kind: str, names: Sequence[str], checkpoint: Path, ranges: dict[str, ShapeRange],
                   precision: Precision, workdir: Path, threads: int, device: str | None) -> list[Backend]:
    """Open each requested backend; exports (validated) to *workdir* when a backend needs an ONNX/engine file."""
    from export.api import export_model

    need = {"onnx" if n.startswith("onnxruntime") else "engine" for n in names if n != "torch"}
    if need:
        export_model(kind, checkpoint, workdir, fmt="engine" if "engine" in need else "onnx", precision=precision,
                     ranges=ranges)
    out = []
    for n in names:
        cfg = BackendConfig(precision=precision, threads=threads, device=device)
        out.append(make_backend(kind, checkpoint if n == "torch" else workdir, n, cfg))
    return out


def bench(kind: str, shape: Sequence[int], backends: Sequence[str], precision: Precision | str = Precision.FP32,
          checkpoint: Path | None = None, batch: int = 4, repeats: int = 5, warmup: int = 1, threads: int = 0,
          device: str | None = None, end_to_end: bool = True) -> BenchResult:
    """Benchmark *kind* on *backends* for one volume (VSI-SR: Z×Y×X stack; RL-DFN: Z×Y×X patch).

    Steps — VSI-SR: ``network`` (one batch of *batch* 7-plane windows of Y×X), ``step2`` (the whole stack through
    :func:`engines.vsisr.lateral.lateral_sr`: three orientations, recombination).  RL-DFN: ``rl-step`` (torch FFT,
    same for every backend), ``network`` and ``patch`` (both).
    """
    from engines.device import pick_device

    precision = Precision(precision)
    known = [b.value for b in BackendName if b is not BackendName.AUTO]
    unknown = [b for b in backends if b not in known]
    if unknown or not backends:
        raise ValueError(f"unknown backend(s) {unknown or '(none given)'}; choose from {', '.join(known)}")
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    probes = [matmul_probe(dev, precision), conv_probe(dev, precision)]
    mk = get_model(kind)
    with tempfile.TemporaryDirectory(prefix="rllsm-bench-") as tmp:
        tmpdir = Path(tmp)
        if checkpoint is None:
            checkpoint = tmpdir / "random-init.pt"
            mk.save(mk.build_random(0), checkpoint)
        module = mk.load(checkpoint)
        z, y, x = (int(s) for s in shape)
        if kind == "vsi-sr":

            net_shape = [batch, 7, y, x]
            # Step 2 rotates the stack by 60°/120°: planes grow to about (|cos|+|sin|)·size, batches ≤ batch.
            grown = int(np.ceil(max(y, x) * 1.37)) + 4
            rng = ShapeRange(min=[1, 7, min(y, x), min(y, x)], opt=net_shape, max=[batch, 7, grown, grown])
            ranges = {"planes": rng}
        else:
            net_shape = [1, 1, z, y, x]
            ranges = {n: ShapeRange(min=net_shape, opt=net_shape, max=net_shape) for n in mk.spec.input_names}
        opened = _open_backends(kind, backends, checkpoint, ranges, precision, tmpdir / "model", threads, device)
        gen = np.random.default_rng(0)
        rows: list[Row] = []
        try:
            inputs = [gen.random(net_shape, dtype=np.float32) for _ in mk.spec.input_names]
            flops = count_flops(module, *(torch.from_numpy(a) for a in inputs))
            if dev.type == "cuda":
                inputs_dev: list[Any] = [torch.from_numpy(a).to(dev) for a in inputs]
            else:
                inputs_dev = inputs
            net_items = ("planes", batch) if kind == "vsi-sr" else ("patches", 1)
            pairs = [(Row("network", b.describe(), *net_items, flops=flops), (lambda b=b: b(*inputs_dev)))
                     for b in opened]
            _interleaved(pairs + probes, repeats, warmup, dev)
            rows += [r for r, _ in pairs]
            if end_to_end:
                rows += _end_to_end(kind, opened, (z, y, x), batch, repeats, dev, flops, gen, probes, module)
        finally:
            for b in opened:
                b.unload()
    # The best sample of the faster probe is the peak (the least-disturbed moment); networks are judged by median.
    peak_row = max((r for r, _ in probes), key=lambda r: (r.flops or 0.0) / min(r.times_s))
    peak = (peak_row.flops or 0.0) / min(peak_row.times_s) / 1e12
    return BenchResult(device=_device_name(dev), threads=torch.get_num_threads(), peak_tflops=peak,
                       peak_desc=f"{peak_row.step}, best of {len(peak_row.times_s)} samples interleaved with the "
                                 "networks", rows=rows)


def _end_to_end(kind: str, opened: list[Backend], zyx: tuple[int, int, int], batch: int, repeats: int,
                dev: torch.device, net_flops: float, gen: np.random.Generator,
                probes: list[tuple[Row, Callable[[], Any]]], module: torch.nn.Module) -> list[Row]:
    z, y, x = zyx
    if kind == "vsi-sr":
        from engines.config import OpticsConfig
        from engines.vsisr.lateral import LateralSRParams, lateral_sr
        from engines.vsisr.otf import generate_otfs

        vol = gen.random((z, y, x), dtype=np.float32)
        otfs = generate_otfs(OpticsConfig(), (64, 64))
        params = LateralSRParams(batch_size=batch)
        # One untimed run records the shapes Step 2 feeds the network (rotated planes are larger), so the
        # end-to-end rows can report the network FLOPs they contain.
        seen: list[tuple[int, ...]] = []

        def recording(xb: np.ndarray) -> Any:
            seen.append(tuple(xb.shape))
            return opened[0](xb)

        lateral_sr(vol, recording, otfs, params, device=dev)
        step_flops = sum(count_flops(module, torch.empty(s)) for s in seen)
        pairs = [(Row("step2 (whole stack)", b.describe(), "stacks", 1, flops=step_flops),
                  (lambda b=b: lateral_sr(vol, b, otfs, params, device=dev))) for b in opened]
        _interleaved(pairs + probes, repeats, 0, dev)
        return [r for r, _ in pairs]
    from engines.rldfn.rl import psf_to_otf, rl_corrections

    zz, yy, xx = np.meshgrid(*(np.arange(n) - n // 2 for n in (z, y, x)), indexing="ij")
    psf = np.exp(-(xx**2 + yy**2) / 4.0 - zz**2 / 16.0).astype(np.float32)
    otf_a = psf_to_otf(psf, (z, y, x), dev)
    otf_b = psf_to_otf(psf.transpose(0, 2, 1).copy() if y == x else psf, (z, y, x), dev)
    va = torch.from_numpy(gen.random((1, 1, z, y, x), dtype=np.float32)).to(dev)
    vb = torch.from_numpy(gen.random((1, 1, z, y, x), dtype=np.float32)).to(dev)

    def rl() -> tuple[torch.Tensor, torch.Tensor]:
        return rl_corrections(va, vb, (va + vb) / 2, otf_a, otf_b)

    rl_row = Row("rl-step (torch FFT)", f"torch {dev}", "patches", 1)
    _interleaved([(rl_row, rl), *probes], repeats, 1, dev)
    pairs = [(Row("patch (rl-step + network)", b.describe(), "patches", 1, flops=net_flops),
              (lambda b=b: b(*rl()))) for b in opened]
    _interleaved(pairs + probes, repeats, 1, dev)
    return [rl_row] + [r for r, _ in pairs]


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import os
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
