"""Counters, queue-depth gauges and per-stage latency of the live service, with a Prometheus endpoint.

One :class:`Metrics` object is shared by every thread of the service. Users of other tools ask for per-stage latency
(DeepCAD-RT) and for knowing when frames are lost; so every drop has a counter and every stage a timer:

>>> m = Metrics()
>>> with m.stage_timer("deskew"):
...     pass
>>> m.inc("frames_dropped", labels={"where": "ingest"})
>>> m.snapshot()["stages"]["deskew"]["count"]
1

The Prometheus endpoint reads the same numbers on each scrape (a custom collector), so there is exactly one source of
truth and no double bookkeeping. It binds to loopback only: metrics describe a private acquisition.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from engines.errors import RllsmValueError
from engines.support import StrictModel

METRICS_CONFIG_VERSION = 1
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[tuple[str, str], ...]


class MetricsError(RllsmValueError):
    """A metric name, label or endpoint setting is not usable."""


class MetricsConfig(StrictModel):
    """Where the Prometheus endpoint listens and how many recent samples the percentiles use."""

    version: Literal[1] = METRICS_CONFIG_VERSION
    host: str = Field("127.0.0.1", description="Loopback address the /metrics endpoint binds to.")
    port: int = Field(9108, ge=0, le=65535, description="TCP port of /metrics; 0 picks a free one.")
    window: int = Field(1024, ge=8, le=1_000_000, description="Samples per stage kept for p50/p99.")
    namespace: str = Field("rllsm", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$", description="Prefix of exported names.")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise MetricsError(f"metric name {name!r} must be letters, digits and underscores, not starting with a digit")
    return name


def _label_key(labels: Mapping[str, Any] | None) -> LabelKey:
    if not labels:
        return ()
    for k in labels:
        _check_name(k)
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _fmt(name: str, key: LabelKey) -> str:
    if not key:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in key) + "}"


@dataclass
class _Stage:
    durations: deque[float]
    count: int = 0
    total_s: float = 0.0


@dataclass
class _Rate:
    # (monotonic time, items, bytes) of recent events, for a rate over the last ``horizon_s`` seconds
    events: deque[tuple[float, int, int]]
    items: int = 0
    nbytes: int = 0


class Metrics:
    """Thread-safe counters, gauges, stage timers and throughput meters.

    Parameters
    ----------
    config
        Window of the percentile estimates and where :meth:`serve_http` listens.
    rate_horizon_s
        Throughput is averaged over events of the last this-many seconds.
    """

    def __init__(self, config: MetricsConfig | None = None, *, rate_horizon_s: float = 10.0) -> None:
        self.config = config or MetricsConfig()
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, LabelKey], float] = {}
        self._gauges: dict[tuple[str, LabelKey], float] = {}
        self._stages: dict[str, _Stage] = {}
        self._rates: dict[str, _Rate] = {}
        self._horizon = float(rate_horizon_s)
        self._started = time.monotonic()
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    # --- recording ------------------------------------------------------------------------------------------------

    def inc(self, name: str, n: float = 1, *, labels: Mapping[str, Any] | None = None) -> None:
        """Add ``n`` to counter ``name`` (created at 0 on first use)."""
        key = (_check_name(name), _label_key(labels))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + n

    def declare(self, name: str, *, labels: Mapping[str, Any] | None = None) -> None:
        """Create counter ``name`` at 0, so a scrape shows 'no drops' rather than nothing."""
        self.inc(name, 0, labels=labels)

    def counter(self, name: str, *, labels: Mapping[str, Any] | None = None) -> float:
        """Current value of a counter (0 if never incremented)."""
        with self._lock:
            return self._counters.get((name, _label_key(labels)), 0)

    def set_gauge(self, name: str, value: float, *, labels: Mapping[str, Any] | None = None) -> None:
        """Set gauge ``name`` (e.g. a queue depth) to ``value``."""
        key = (_check_name(name), _label_key(labels))
        with self._lock:
            self._gauges[key] = float(value)

    def gauge(self, name: str, *, labels: Mapping[str, Any] | None = None) -> float | None:
        with self._lock:
            return self._gauges.get((name, _label_key(labels)))

    def observe(self, stage: str, seconds: float) -> None:
        """Record one duration of ``stage``."""
        _check_name(stage)
        with self._lock:
            st = self._stages.get(stage)
            if st is None:
                st = self._stages[stage] = _Stage(deque(maxlen=self.config.window))
            st.durations.append(seconds)
            st.count += 1
            st.total_s += seconds

    @contextmanager
    def stage_timer(self, stage: str) -> Iterator[None]:
        """Time the ``with`` block as one sample of ``stage`` (recorded even if the block raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(stage, time.perf_counter() - t0)

    def add_throughput(self, name: str, items: int = 1, nbytes: int = 0) -> None:
        """Count ``items`` (and ``nbytes``) passing point ``name`` now."""
        _check_name(name)
        now = time.monotonic()
        with self._lock:
            r = self._rates.get(name)
            if r is None:
                r = self._rates[name] = _Rate(deque())
            r.events.append((now, items, nbytes))
            r.items += items
            r.nbytes += nbytes
            self._trim(r, now)

    def _trim(self, r: _Rate, now: float) -> None:
        while r.events and now - r.events[0][0] > self._horizon:
            r.events.popleft()

    # --- reading --------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain-JSON view of everything: counters, gauges, per-stage p50/p99 (ms) and throughput.

        Returns
        -------
        dict
            ``{"uptime_s", "counters": {name: value}, "gauges": {...}, "stages": {stage: {"count", "p50_ms",
            "p99_ms", "mean_ms", "max_ms", "total_s"}}, "throughput": {name: {"items_total", "bytes_total", "items_per_s",
            "bytes_per_s"}}}``; labelled series are keyed ``name{label=value}``.
        """
        now = time.monotonic()
        with self._lock:
            counters = {_fmt(n, k): v for (n, k), v in sorted(self._counters.items())}
            gauges = {_fmt(n, k): v for (n, k), v in sorted(self._gauges.items())}
            stages = {name: (list(st.durations), st.count, st.total_s) for name, st in self._stages.items()}
            rates = {}
            for name, r in self._rates.items():
                self._trim(r, now)
                rates[name] = (list(r.events), r.items, r.nbytes)
        out_stages: dict[str, dict[str, float]] = {}
        for name, (durs, count, total) in sorted(stages.items()):
            arr = np.asarray(durs) * 1e3
            out_stages[name] = {
                "count": count,
                "p50_ms": float(np.percentile(arr, 50)) if arr.size else float("nan"),
                "p99_ms": float(np.percentile(arr, 99)) if arr.size else float("nan"),
                "mean_ms": total * 1e3 / count if count else float("nan"),
                "max_ms": float(arr.max()) if arr.size else float("nan"),
                "total_s": total,
            }
        out_rates: dict[str, dict[str, float]] = {}
        for name, (events, items, nbytes) in sorted(rates.items()):
            if len(events) >= 2:
                span = max(now - events[0][0], 1e-9)
                # the first event opens the window; it is not part of the rate measured over it
                n_items = sum(e[1] for e in events[1:])
                n_bytes = sum(e[2] for e in events[1:])
                ips, bps = n_items / span, n_bytes / span
            else:
                ips = bps = 0.0
            out_rates[name] = {"items_total": items, "bytes_total": nbytes, "items_per_s": ips, "bytes_per_s": bps}
        return {
            "uptime_s": now - self._started,
            "counters": counters,
            "gauges": gauges,
            "stages": out_stages,
            "throughput": out_rates,
        }

    # --- Prometheus -----------------------------------------------------------------------------------------------

    def registry(self) -> Any:
        """A fresh ``prometheus_client.CollectorRegistry`` whose only collector reads this object on each scrape."""
        from prometheus_client import CollectorRegistry

        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Collector(self))
        return reg

    def serve_http(self, port: int | None = None, host: str | None = None) -> int:
        """Start the ``/metrics`` HTTP endpoint in a daemon thread; returns the bound port.

        Raises
        ------
        MetricsError
            If ``host`` is not a loopback address, or the port cannot be bound.
        """
        from prometheus_client import start_http_server

        host = host or self.config.host
        port = self.config.port if port is None else port
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise MetricsError(f"metrics endpoint host {host!r} is not a loopback address; use 127.0.0.1 or ::1")
        if self._server is not None:
            raise MetricsError(f"metrics endpoint already serving on port {self.port}")
        try:
            self._server, self._server_thread = start_http_server(port, addr=host, registry=self.registry())
        except OSError as err:
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from None
        return self.port

    @property
    def port(self) -> int | None:
        """Port of the running endpoint, or None."""
        return None if self._server is None else int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint if it runs."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server = self._server_thread = None


class _Collector:
    """Turns a :class:`Metrics` snapshot into Prometheus metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        ns = self.m.config.namespace
        with self.m._lock:
            counters = dict(self.m._counters)
            gauges = dict(self.m._gauges)
        for families, kind in ((counters, CounterMetricFamily), (gauges, GaugeMetricFamily)):
            by_name: dict[str, list[tuple[LabelKey, float]]] = {}
            for (name, key), value in families.items():
                by_name.setdefault(name, []).append((key, value))
            for name, series in sorted(by_name.items()):
                labels = sorted({k for key, _ in series for k, _v in key})
                fam = kind(f"{ns}_{name}", f"rllsm {name}", labels=labels)
                for key, value in series:
                    d = dict(key)
                    fam.add_metric([d.get(lbl, "") for lbl in labels], value)
                yield fam
        snap = self.m.snapshot()
        if snap["stages"]:
            lat = SummaryMetricFamily(f"{ns}_stage_seconds", "per-stage latency", labels=["stage"])
            p50 = GaugeMetricFamily(f"{ns}_stage_p50_seconds", "median stage latency (rolling window)", labels=["stage"])
            p99 = GaugeMetricFamily(f"{ns}_stage_p99_seconds", "99th percentile stage latency (rolling window)",
                                    labels=["stage"])
            for stage, s in snap["stages"].items():
                lat.add_metric([stage], count_value=s["count"], sum_value=s["total_s"])
                p50.add_metric([stage], s["p50_ms"] / 1e3)
                p99.add_metric([stage], s["p99_ms"] / 1e3)
            yield lat
            yield p50
            yield p99
        if snap["throughput"]:
            items = GaugeMetricFamily(f"{ns}_throughput_items_per_second", "recent rate", labels=["point"])
            nbytes = GaugeMetricFamily(f"{ns}_throughput_bytes_per_second", "recent byte rate", labels=["point"])
            for point, r in snap["throughput"].items():
                items.add_metric([point], r["items_per_s"])
                nbytes.add_metric([point], r["bytes_per_s"])
            yield items
            yield nbytes
