"""Physical floors shared by the benchmark modules: what a copy of the same bytes costs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import concurrent.futures
    from collections.abc import Callable, Iterable

__all__ = ["copy_all_floor"]

_Pair = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


def copy_all_floor(
    arrays: Iterable[np.ndarray[Any, Any]],
    pool: concurrent.futures.ThreadPoolExecutor,
    workers: int | None = None,
) -> Callable[[], None]:
    """A copy of ``arrays`` into preallocated buffers on ``workers`` threads of ``pool`` (all
    cores by default), split into bins balanced by bytes (np.copyto releases the GIL), as
    asyncckpt's snapshot splits its copy over the cores. Returns the copy to time."""
    workers = workers or os.cpu_count() or 1
    bins: list[list[_Pair]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for value in sorted(arrays, key=lambda v: -v.nbytes):
        slot = loads.index(min(loads))
        bins[slot].append((np.empty_like(value), value))
        loads[slot] += value.nbytes

    def copy_bin(pairs: list[_Pair]) -> None:
        for dst, src in pairs:
            np.copyto(dst, src)

    def run() -> None:
        for future in [pool.submit(copy_bin, b) for b in bins]:
            future.result()

    return run
