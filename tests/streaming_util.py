"""Small helpers shared by the streaming-service tests: build wire messages and push them to a service."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import zmq

from streamer import wire


def start_msg(acq: str, z: int, shape: tuple[int, int], seq: int = 0, **kw: Any) -> list[Any]:
    return wire.encode(wire.AcquisitionStart(acquisition_id=acq, seq=seq, z_count=z, frame_shape=shape, **kw))


def end_msg(acq: str, seq: int, n: int) -> list[Any]:
    return wire.encode(wire.AcquisitionEnd(acquisition_id=acq, seq=seq, n_messages=n))


def stack_frames(
    acq: str, t: int, stack: np.ndarray, rng: np.random.Generator | None, seq0: int, channel: int = 0,
    planes: list[int] | None = None,
) -> list[list[Any]]:
    """Frame messages of one stack, in a shuffled order when ``rng`` is given (out-of-order delivery)."""
    zs = list(range(stack.shape[0])) if planes is None else planes
    if rng is not None:
        zs = [zs[i] for i in rng.permutation(len(zs))]
    out = []
    for k, z in enumerate(zs):
        h = wire.pixels_header(stack[z], acquisition_id=acq, seq=seq0 + k, timepoint=t, channel=channel,
                               z_index=int(z), z_count=stack.shape[0])
        out.append(wire.encode(h, stack[z]))
    return out


@contextmanager
def pusher(endpoint: str, ctx: zmq.Context | None = None, timeout_s: float = 10.0) -> Iterator[zmq.Socket]:
    ctx = ctx or zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    s.setsockopt(zmq.LINGER, int(timeout_s * 1000))
    s.connect(endpoint)
    try:
        yield s
    finally:
        s.close()


def send_all(sock: zmq.Socket, messages: list[list[Any]]) -> None:
    for m in messages:
        sock.send_multipart(m, copy=False)
