"""Progress bars for the long phases (DAP stages, fine-tunes): live in a terminal, sparse in a log file."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, description: str, enabled: bool, initial: int = 0) -> tqdm:
    # a log file gets a line every 30 s instead of a redraw every 0.1 s
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, desc=description, disable=not enabled, dynamic_ncols=True,
                leave=False, mininterval=interval)
