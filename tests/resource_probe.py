"""Measure a real ``rllsm serve`` subprocess from outside: resident memory and thread count from /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads")


class Served:
    """``rllsm serve`` on loopback in a subprocess, with a sampler of its peak RSS and thread count."""

    def __init__(self, workdir: Path, *extra: str, mode: str = "classical") -> None:
        cmd = [sys.executable, "-m", "streamer", "serve", "--ingest", "tcp://127.0.0.1:0", "--control",
               "tcp://127.0.0.1:0", "--display", "none", "-r", str(workdir / "rec"), "--out", str(workdir / "out"),
               "--mode", mode, "--device", "cpu", *extra]
        self.log = open(workdir / "serve.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"serve did not start: {(workdir / 'serve.log').read_text()[-2000:]}")
        self.endpoints: dict[str, str] = json.loads(line)
        self.peak_rss = self.peak_threads = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                self.peak_rss = max(self.peak_rss, rss_mb(self.proc.pid))
                self.peak_threads = max(self.peak_threads, threads(self.proc.pid))
            except (OSError, RuntimeError):
                return
            self._stop.wait(0.01)

    def reset_peaks(self) -> None:
        self.peak_rss, self.peak_threads = rss_mb(self.proc.pid), threads(self.proc.pid)

    def status(self) -> dict[str, Any]:
        from streamer.service import request

        return request(self.endpoints["control"], "status", timeout_s=10)

    def status_bytes(self) -> int:
        import zmq

        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)
        s.connect(self.endpoints["control"])
        s.send(b'{"cmd": "status"}')
        n = len(s.recv())
        s.close()
        return n

    def caught_up(self, n_sent: int) -> bool:
        q = self.status()
        return q["counters"].get("messages_received", 0) >= n_sent and q["queues"]["backlog"] == 0

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        from streamer.service import request

        try:
            request(self.endpoints["control"], "stop", timeout_s=10)
        except Exception:
            self.proc.kill()
        out, _ = self.proc.communicate(timeout=timeout)
        self._stop.set()
        self.log.close()
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stop.set()
        if not self.log.closed:
            self.log.close()
