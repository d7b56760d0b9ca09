"""Reprocessing and live scale-out on Dask distributed: one task per (timepoint, channel) volume.

* :func:`open_client` — an embedded ``LocalCluster`` (``LocalCUDACluster`` on GPU machines) or a running scheduler.
* :func:`run_volumes` — volumes into one OME-Zarr, each task writing its own shards; a ledger makes reruns resume.
* :func:`reconstruct_distributed`, :func:`replay_distributed` — ``rllsm reconstruct`` / ``rllsm replay --offline``.
* :class:`DaskStageWorker` — the live service's stage worker on a cluster (``rllsm serve --scheduler``).

Dask is an optional dependency (``pip install rllsm-vsim[cluster]``); nothing here is imported by in-process runs.
"""

from __future__ import annotations

from streamer.distributed.cluster import open_client
from streamer.distributed.errors import DistributedError, VolumeRejected
from streamer.distributed.recipe import Recipe, cache_info
from streamer.distributed.runner import RunSummary, VolumeJob, run_volumes
from streamer.distributed.store import Ledger, read_volume

__all__ = ["DistributedError", "Ledger", "Recipe", "RunSummary", "VolumeJob", "VolumeRejected", "cache_info",
           "open_client", "read_volume", "run_volumes"]
