"""Console output: a progress bar within an epoch, only when stdout is a terminal."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield a `tick()` that advances a tqdm bar; a no-op when not on a terminal (logs stay clean)."""
    if not (enabled and sys.stdout.isatty()):
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
        yield lambda: bar.update(1)
