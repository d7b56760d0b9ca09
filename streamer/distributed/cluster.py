"""Start an embedded Dask cluster or connect to a running scheduler.

``--workers N`` starts a ``LocalCluster`` of N single-threaded worker processes (torch parallelises inside each), or,
on a machine with CUDA GPUs and dask-cuda installed, a ``LocalCUDACluster`` with one worker per GPU (at most N).
``--scheduler ADDRESS`` connects to any running scheduler (``dask scheduler``, dask-jobqueue, a Kubernetes
operator); its workers need this package installed and the inputs/outputs on a filesystem they share.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from streamer.distributed.errors import DistributedError

log = logging.getLogger(__name__)


def _gpu_count(device: str | None) -> int:
    if device == "cpu":
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def worker_environ() -> dict[str, object]:
    """Dask's worker environment without ``MALLOC_TRIM_THRESHOLD_``.

    Setting that variable turns off glibc's adaptive mmap threshold, so every large torch/numpy buffer is mapped and
    page-faulted afresh: the reconstruction ran 2.4× slower in a worker than in-process (2-core machine, same
    threads). ``OMP_NUM_THREADS=1`` and friends stay: torch's intra-op threads are set per task from the recipe.
    """
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env


def dashboard_available() -> bool:
    """The dashboard needs bokeh (``pip install bokeh``); without it the cluster works, unwatched."""
    return importlib.util.find_spec("bokeh") is not None


def start_local_cluster(workers: int, *, device: str | None = None, allowed_failures: int = 3,
                        dashboard: bool = True, say: Callable[[str], None] = print) -> Any:
    """A ``LocalCUDACluster`` (one worker per GPU) when GPUs and dask-cuda exist, else a ``LocalCluster``."""
    import dask
    from distributed import LocalCluster

    if workers < 1:
        raise DistributedError(f"--workers must be at least 1, got {workers}")
    # Tasks lost with their worker are rescheduled; a volume that kills this many workers is given up and reported.
    dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures})
    dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})
    address = ":0" if dashboard and dashboard_available() else None
    gpus = _gpu_count(device)
    if gpus:
        if importlib.util.find_spec("dask_cuda") is not None:
            from dask_cuda import LocalCUDACluster

            n = min(workers, gpus)
            say(f"starting {n} GPU worker{'s' * (n > 1)} (LocalCUDACluster, one per GPU)")
            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=list(range(n)), threads_per_worker=1,
                                    dashboard_address=address, silence_logs=logging.ERROR)
        say(f"{gpus} GPU(s) but dask-cuda is not installed (pip install dask-cuda): every worker uses the default GPU")
    say(f"starting {workers} worker process{'es' * (workers > 1)} (LocalCluster)")
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=address,
                        silence_logs=logging.ERROR)


@contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None, *, device: str | None = None,
                allowed_failures: int = 3, timeout_s: float = 30.0,
                say: Callable[[str], None] = print) -> Iterator[Any]:
    """A ``distributed.Client`` on an embedded cluster (``workers``) or a running one (``scheduler``).

    Prints the dashboard address (or why there is none). The embedded cluster is shut down on exit.

    Raises
    ------
    DistributedError
        Dask is not installed, both or neither of ``workers``/``scheduler`` given, the scheduler is unreachable.
    """
    if (workers is None) == (scheduler is None):
        raise DistributedError("give either a number of workers or a scheduler address, not both or neither")
    try:
        from distributed import Client
    except ImportError:
        raise DistributedError("distributed runs need Dask: pip install 'rllsm-vsim[cluster]'") from None
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # Dask logs every connection at INFO; -v shows them
        logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = None
    try:
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout=f"{timeout_s}s")
            except (OSError, TimeoutError) as err:
                raise DistributedError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
        else:
            assert workers is not None
            cluster = start_local_cluster(workers, device=device, allowed_failures=allowed_failures, say=say)
            client = Client(cluster)
    except DistributedError:
        raise
    except ValueError as err:  # a malformed address
        raise DistributedError(f"scheduler address {scheduler!r}: {err}") from None
    try:
        link = client.dashboard_link if (cluster is None or dashboard_available()) else None
        say(f"Dask dashboard: {link}" if link else "Dask dashboard: off (pip install bokeh to watch the run)")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
