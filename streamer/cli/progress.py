"""Progress on stderr for work whose steps cannot report themselves: an elapsed-time line that keeps moving."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def heartbeat(desc: str, *, disable: bool = False, interval_s: float = 1.0) -> Iterator[tqdm]:
    """Show ``desc: <elapsed>`` on stderr, refreshed every *interval_s*, until the block ends.

    The yielded bar's ``set_postfix_str`` names the current step where the caller knows it.
    """
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}{postfix}", disable=disable, leave=False)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            bar.refresh()

    thread = threading.Thread(target=beat, name="rllsm-progress", daemon=True)
    if not disable:
        thread.start()
    try:
        yield bar
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=2 * interval_s)
        bar.close()
