"""Running a memory probe in a fresh interpreter: the peak RSS growth of one computation, two ways.

glibc's malloc moves its mmap threshold after every large free, so how much freed memory a later allocation reuses
(and how far RSS grows) depends on what ran before: the same patch forward grew the peak RSS by 161–216 MiB from run
to run. Run as the service runs (``steady=False``) the growth is what a budget must bound; with a fixed threshold
(``steady=True``, every large block mapped and unmapped) it is the live memory alone, the same every run — what an
estimate must not overshoot by much.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: Fixed mmap and trim thresholds: every block over 128 KiB is its own mapping, returned on free.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_growth(probe: str, *args: object, steady: bool = False, timeout: float = 300) -> int:
    """Bytes the probe script reports as ``{"growth": …}`` on its last stdout line."""
    env = {**os.environ, **(STEADY_MALLOC if steady else {})}
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["growth"])
