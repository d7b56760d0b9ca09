"""Transport, orchestration and I/O of rllsm-vsim: wire schema, ZMQ ingest/publish, pipeline, sinks, CLI."""

__version__ = "0.1.0"
