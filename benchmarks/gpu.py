"""GPU benchmark: saving CUDA tensors, against DCP's async_save, torch.save and the floor.

The state is a dict of CUDA tensors of ``--tensor-mib`` MiB each (256 by default), float32
and bfloat16 in turn, of 1, 4 and 8 GiB in all (``--sizes``). Before every save each tensor
is updated in place (an optimizer step) and the device synchronized. Figures, per size:

- ``pinned_d2h`` (the floor): the same bytes copied into preallocated pinned host tensors,
  ``pinned.copy_(t, non_blocking=True)`` for each, then one synchronize;
- asyncckpt (a ``CheckpointManager`` with ``max_pending=0``, its pinned buffers reserved
  first): ``asyncckpt_stall``, how long ``await manager.save(...)`` blocks the caller (it
  returns once the device-to-host copy has landed), ``asyncckpt_durable``, from the call to
  ``await manager.wait()`` returning (fsynced), and ``asyncckpt_restore_into``, a restore
  into the CUDA tensors in place, from the page cache;
- ``torch.distributed.checkpoint.async_save`` (one process, ``no_dist=True``, its default
  stager and ``FileSystemWriter``): ``dcp_stall``, until it returns, ``dcp_durable``, until
  its future's result; ``dcp_load_into``, ``dcp.load`` into the CUDA tensors;
- ``torch.save`` of the same dict into one file, flushed and fsynced (``torch_save``: it
  blocks throughout); ``torch_load_into``, ``torch.load(mmap=True)`` then ``copy_`` into
  the CUDA tensors.

Every figure is the median of ``--repeats`` runs (after one warm-up) with min and max; the
ratios compare figures of the same run, the target being asyncckpt's stall at most 1.1 x
the floor. Everything writes to the same directory (``--workdir``, a temporary directory by
default); a case whose device or host memory would not hold it is reported as skipped, and
so is one that would overrun the time budget (``--budget-secs``, 270: the run stays under
five minutes).

Not run on the project's machines, which have no GPU (docs/PERFORMANCE.md).

Usage::

    python -m benchmarks.gpu                      # 1, 4 and 8 GiB
    python -m benchmarks.gpu --smoke              # 64 MiB in 16 MiB tensors, seconds
    python -m benchmarks.gpu --sizes 2 --repeats 5 --workdir /nvme/tmp

Prints exactly one JSON line on standard output (progress and any library's output go to
standard error); without a CUDA device, ``{"skipped": "no CUDA device: ..."}``, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from typing import Any, Final

__all__ = ["main", "run"]

GiB: Final = 1 << 30
MiB: Final = 1 << 20
STALL_TARGET: Final = 1.1
"""asyncckpt's stall over the pinned device-to-host copy of the same bytes, at most."""


def _log(message: str) -> None:
    sys.stderr.write(f"[gpu] {message}\n")
    sys.stderr.flush()


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the benchmark, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees none (torch.cuda.is_available() is False)"
    return None


def _available_host_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _make_state(total: int, tensor_bytes: int) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {}
    for index in range(max(1, total // tensor_bytes)):
        dtype = torch.float32 if index % 2 == 0 else torch.bfloat16
        count = tensor_bytes // torch.empty((), dtype=dtype).element_size()
        state[f"t{index:03d}"] = torch.randn(count, device="cuda").to(dtype)
    torch.cuda.synchronize()
    return state


def _step(state: dict[str, Any]) -> None:
    """An optimizer step: every tensor changed in place, then the device idle."""
    import torch

    for tensor in state.values():
        tensor.add_(1)
    torch.cuda.synchronize()


def _empty_host_cache() -> None:
    # Pinned memory a figure freed stays cached by torch; give it back between figures so
    # that each case's host memory is its own.
    import torch

    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is not None:
        empty()


def _pinned_d2h(state: dict[str, Any], repeats: int) -> list[float]:
    import torch

    pinned = {key: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for key, t in state.items()}
    samples = []
    for round_ in range(repeats + 1):
        _step(state)
        began = time.perf_counter()
        for key, tensor in state.items():
            pinned[key].copy_(tensor, non_blocking=True)
        torch.cuda.synchronize()
        if round_:
            samples.append(time.perf_counter() - began)
    del pinned
    _empty_host_cache()
    return samples


async def _asyncckpt(state: dict[str, Any], directory: str, repeats: int) -> dict[str, Any]:
    import torch

    from asyncckpt import CheckpointManager

    samples: dict[str, list[float]] = defaultdict(list)
    async with CheckpointManager(directory, max_to_keep=1, max_pending=0) as manager:
        began = time.perf_counter()
        await manager.reserve(state)
        reserve_secs = time.perf_counter() - began
        for step in range(repeats + 1):  # the first one warms the side stream and the disk
            _step(state)
            began = time.perf_counter()
            await manager.save(state, step)
            returned = time.perf_counter()
            await manager.wait()
            durable = time.perf_counter()
            if step:
                samples["asyncckpt_stall"].append(returned - began)
                samples["asyncckpt_durable"].append(durable - began)
        expected = next(iter(state.values())).clone()
        for _ in range(repeats):
            _step(state)
            began = time.perf_counter()
            await manager.restore(into=state)
            torch.cuda.synchronize()
            samples["asyncckpt_restore_into"].append(time.perf_counter() - began)
        restored_ok = torch.equal(next(iter(state.values())), expected)
        stats = manager.statistics()
    _empty_host_cache()
    return {
        "samples": samples,
        "reserve_s": reserve_secs,
        "restored_matches": restored_ok,
        "buffers_allocated": stats.buffers_allocated,
        "max_stall_stat_s": stats.max_stall_secs,
    }


def _dcp(state: dict[str, Any], directory: str, repeats: int) -> dict[str, list[float]] | str:
    import torch

    try:
        from torch.distributed.checkpoint.state_dict_loader import load
        from torch.distributed.checkpoint.state_dict_saver import async_save
    except ImportError as exc:
        return f"skipped: torch.distributed.checkpoint is not importable ({exc})"
    samples: dict[str, list[float]] = defaultdict(list)
    path = ""
    with warnings.catch_warnings():
        # One process, no process group: DCP warns that it assumes so.
        warnings.simplefilter("ignore")
        for round_ in range(repeats + 1):
            if path:
                shutil.rmtree(path, ignore_errors=True)
            path = os.path.join(directory, f"dcp-{round_}")
            _step(state)
            began = time.perf_counter()
            result: Any = async_save(state, checkpoint_id=path, no_dist=True)
            returned = time.perf_counter()
            # A Future, or (with an asynchronous stager) a response holding the upload's.
            getattr(result, "upload_completion", result).result()
            durable = time.perf_counter()
            if round_:
                samples["dcp_stall"].append(returned - began)
                samples["dcp_durable"].append(durable - began)
        for _ in range(repeats):
            began = time.perf_counter()
            load(state, checkpoint_id=path, no_dist=True)
            torch.cuda.synchronize()
            samples["dcp_load_into"].append(time.perf_counter() - began)
    shutil.rmtree(path, ignore_errors=True)
    return samples


def _torch_save(state: dict[str, Any], directory: str, repeats: int) -> dict[str, list[float]]:
    import torch

    samples: dict[str, list[float]] = defaultdict(list)
    path = os.path.join(directory, "torch.pt")
    for round_ in range(repeats + 1):
        _step(state)
        began = time.perf_counter()
        with open(path, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        if round_:
            samples["torch_save"].append(time.perf_counter() - began)
    for _ in range(repeats):
        began = time.perf_counter()
        loaded = torch.load(path, mmap=True, weights_only=True)
        for key, tensor in state.items():
            tensor.copy_(loaded[key])
        torch.cuda.synchronize()
        samples["torch_load_into"].append(time.perf_counter() - began)
        del loaded
    os.unlink(path)
    return samples


def _ratios(seconds: dict[str, dict[str, float]]) -> dict[str, float]:
    pairs = [
        ("asyncckpt_stall", "pinned_d2h"),
        ("dcp_stall", "pinned_d2h"),
        ("torch_save", "pinned_d2h"),
        ("asyncckpt_stall", "dcp_stall"),
        ("asyncckpt_durable", "dcp_durable"),
        ("asyncckpt_durable", "torch_save"),
        ("asyncckpt_restore_into", "dcp_load_into"),
        ("asyncckpt_restore_into", "torch_load_into"),
    ]
    return {
        f"{a} / {b}": seconds[a]["median"] / seconds[b]["median"]
        for a, b in pairs
        if a in seconds and b in seconds and seconds[b]["median"] > 0
    }


def _room(total: int) -> str | None:
    """Why a state of ``total`` bytes would not fit this machine, or None."""
    import torch

    free, _device_total = torch.cuda.mem_get_info()
    if free < total * 1.2:
        return f"needs {total * 1.2 / GiB:.1f} GiB of device memory, {free / GiB:.1f} free"
    host = _available_host_bytes()
    # Pinned buffers, DCP's staging copy, and room for the page cache.
    if host is not None and host < total * 2.5:
        return f"needs {total * 2.5 / GiB:.1f} GiB of free host memory, {host / GiB:.1f} free"
    return None


def _case(size_gib: float, tensor_bytes: int, repeats: int, workdir: str) -> dict[str, Any]:
    import anyio
    import torch

    total = int(size_gib * GiB)
    case: dict[str, Any] = {"size_GiB": size_gib}
    reason = _room(total)
    if reason is not None:
        case["skipped"] = reason
        return case
    state = _make_state(total, tensor_bytes)
    case["tensors"] = len(state)
    case["bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    directory = os.path.join(workdir, f"{size_gib:g}GiB")
    os.makedirs(directory)
    samples: dict[str, list[float]] = {}
    _log(f"{size_gib:g} GiB: pinned device-to-host copy")
    samples["pinned_d2h"] = _pinned_d2h(state, repeats)
    _log(f"{size_gib:g} GiB: asyncckpt")
    ours = anyio.run(_asyncckpt, state, os.path.join(directory, "asyncckpt"), repeats)
    samples.update(ours.pop("samples"))
    case["asyncckpt"] = ours
    _log(f"{size_gib:g} GiB: torch.distributed.checkpoint")
    dcp = _dcp(state, directory, repeats)
    if isinstance(dcp, str):
        case["dcp"] = dcp
    else:
        samples.update(dcp)
    _log(f"{size_gib:g} GiB: torch.save")
    samples.update(_torch_save(state, directory, repeats))
    shutil.rmtree(directory, ignore_errors=True)
    del state
    torch.cuda.empty_cache()
    seconds = {name: _summary(values) for name, values in samples.items()}
    case["seconds"] = seconds
    case["ratios"] = _ratios(seconds)
    stall_ratio = case["ratios"]["asyncckpt_stall / pinned_d2h"]
    case["target"] = {
        "case": "asyncckpt_stall / pinned_d2h",
        "target": STALL_TARGET,
        "value": stall_ratio,
        "met": stall_ratio <= STALL_TARGET,
    }
    return case


def run(
    sizes: list[float],
    *,
    tensor_mib: int = 256,
    repeats: int = 2,
    workdir: str | None = None,
    budget_secs: float = 270.0,
) -> dict[str, Any]:
    """Run every case that fits the machine and the time budget; return the report."""
    reason = no_cuda_reason()
    if reason is not None:
        return {"skipped": f"no CUDA device: {reason}"}
    import torch

    import asyncckpt

    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "asyncckpt": asyncckpt.__version__,
        "tensor_MiB": tensor_mib,
        "repeats": repeats,
        "cases": [],
    }
    secs_per_gib: float | None = None
    with tempfile.TemporaryDirectory(prefix="asyncckpt-gpu-", dir=workdir) as scratch:
        for size in sizes:
            left = budget_secs - (time.monotonic() - started)
            if secs_per_gib is not None and secs_per_gib * size > left:
                report["cases"].append(
                    {"size_GiB": size, "skipped": f"time budget: about {secs_per_gib * size:.0f}"
                     f" s needed, {left:.0f} s left"}
                )  # fmt: skip
                continue
            case_started = time.monotonic()
            report["cases"].append(_case(size, tensor_mib * MiB, repeats, scratch))
            if "skipped" not in report["cases"][-1]:
                secs_per_gib = (time.monotonic() - case_started) / size
    report["elapsed_s"] = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the GPU benchmark and print its report as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--sizes", default="1,4,8", help="GiB of tensors per case (1,4,8)")
    parser.add_argument("--tensor-mib", type=int, default=256, help="MiB per tensor (256)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure (2)")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--budget-secs", type=float, default=270.0, help="time budget (270)")
    parser.add_argument("--smoke", action="store_true", help="64 MiB in 16 MiB tensors, once")
    args = parser.parse_args(argv)
    if args.smoke:
        sizes, tensor_mib, repeats = [1 / 16], 16, 1
    else:
        sizes = [float(size) for size in args.sizes.split(",")]
        tensor_mib, repeats = args.tensor_mib, args.repeats
    stdout = sys.stdout
    # Exactly one line on standard output, whatever a library prints meanwhile.
    with contextlib.redirect_stdout(sys.stderr):
        report = run(
            sizes,
            tensor_mib=tensor_mib,
            repeats=max(1, repeats),
            workdir=args.workdir,
            budget_secs=args.budget_secs,
        )
    stdout.write(json.dumps(report) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
