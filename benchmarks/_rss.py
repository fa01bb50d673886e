"""Peak RSS of two saves, in a fresh process: ``python -m benchmarks._rss SPEC DIR``.

SPEC is ``count:nbytes[,count:nbytes...]``. Prints one JSON object: the RSS before the state
exists (interpreter + imports), the state's bytes, and the peak RSS (VmHWM) after two saves
(the second reuses the snapshot buffers of the first, the steady state).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import numpy as np

import asyncckpt


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def parse_spec(spec: str) -> list[tuple[int, int]]:
    return [(int(c), int(n)) for c, n in (part.split(":") for part in spec.split(","))]


async def _run(spec: list[tuple[int, int]], directory: str) -> dict[str, Any]:
    before = _status_kib("VmRSS") * 1024
    state: dict[str, np.ndarray[Any, Any]] = {}
    for group, (count, nbytes) in enumerate(spec):
        for i in range(count):
            state[f"g{group}_{i:05d}"] = np.ones(max(nbytes // 4, 1), dtype=np.float32)
    size = sum(v.nbytes for v in state.values())
    with_state = _status_kib("VmRSS") * 1024
    async with asyncckpt.CheckpointManager(directory, max_to_keep=1) as manager:
        for step in (1, 2):
            await manager.save(state, step)
            await manager.wait()
    peak = _status_kib("VmHWM") * 1024
    return {"rss_before_state": before, "rss_with_state": with_state, "state": size, "peak": peak}


def main() -> None:
    spec, directory = sys.argv[1], sys.argv[2]
    result = anyio.run(_run, parse_spec(spec), directory)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
