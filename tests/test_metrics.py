"""Metrics: the numbers are right, and a real Prometheus scrape over HTTP sees the same ones."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.metrics import Metrics, MetricsConfig, MetricsError


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_percentiles_over_rolling_window() -> None:
    m = Metrics(MetricsConfig(window=100))
    for ms in range(1, 201):  # only the last 100 (101..200 ms) are in the window
        m.observe("deskew", ms / 1000)
    st = m.snapshot()["stages"]["deskew"]
    assert st["count"] == 200
    assert st["p50_ms"] == pytest.approx(150.5)
    assert st["p99_ms"] == pytest.approx(199.01)
    assert st["max_ms"] == pytest.approx(200.0)
    assert st["mean_ms"] == pytest.approx(100.5)  # over all samples, not the window


def test_stage_timer_records_even_when_the_stage_fails() -> None:
    m = Metrics()
    with pytest.raises(ZeroDivisionError):
        with m.stage_timer("fuse"):
            1 / 0
    assert m.snapshot()["stages"]["fuse"]["count"] == 1


def test_counters_are_thread_safe() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(5000):
            m.inc("frames_received")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.counter("frames_received") == 20000


def test_throughput_counts_items_and_bytes() -> None:
    m = Metrics()
    for _ in range(10):
        m.add_throughput("ingest", 1, 1000)
    r = m.snapshot()["throughput"]["ingest"]
    assert r["items_total"] == 10 and r["bytes_total"] == 10_000
    assert r["items_per_s"] > 0 and r["bytes_per_s"] == pytest.approx(1000 * r["items_per_s"])


def test_bad_names_are_refused() -> None:
    m = Metrics()
    with pytest.raises(MetricsError, match="letters, digits"):
        m.inc("frames-dropped")
    with pytest.raises(MetricsError, match="letters, digits"):
        m.set_gauge("q", 1, labels={"bad label": "x"})


def test_real_prometheus_scrape_on_random_loopback_port() -> None:
    m = Metrics(MetricsConfig(port=0))
    port = m.serve_http()
    try:
        assert port and port > 0
        m.inc("frames_received", 7)
        m.declare("frames_dropped", labels={"where": "ingest"})
        m.set_gauge("queue_depth", 3, labels={"queue": "assembly"})
        for ms in (10, 20, 30):
            m.observe("reconstruct", ms / 1000)
        got = scrape(port)
        assert got[("rllsm_frames_received_total", ())] == 7
        assert got[("rllsm_frames_dropped_total", (("where", "ingest"),))] == 0  # declared: visible at zero
        assert got[("rllsm_queue_depth", (("queue", "assembly"),))] == 3
        assert got[("rllsm_stage_seconds_count", (("stage", "reconstruct"),))] == 3
        assert got[("rllsm_stage_seconds_sum", (("stage", "reconstruct"),))] == pytest.approx(0.06)
        assert got[("rllsm_stage_p50_seconds", (("stage", "reconstruct"),))] == pytest.approx(0.02)
        # a scrape reads live values, not a copy taken at start
        m.inc("frames_received", 3)
        assert scrape(port)[("rllsm_frames_received_total", ())] == 10
        with pytest.raises(MetricsError, match="already serving"):
            m.serve_http(0)
    finally:
        m.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_endpoint_is_loopback_only_and_busy_port_is_a_typed_error() -> None:
    with pytest.raises(MetricsError, match="not a loopback"):
        Metrics().serve_http(0, host="0.0.0.0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(MetricsError, match="cannot serve metrics"):
            Metrics().serve_http(busy.getsockname()[1])
