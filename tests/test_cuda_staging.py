"""Tensors on a device: staged into pooled pinned buffers, the save waiting for the copy.

Two kinds of tests. Those marked ``needs_cuda`` run on a CUDA device (skipped on machines
without one, as the project's are): bit-exact round trips, pinned and reused buffers, an
update right after ``save()`` returns, restores into CUDA tensors. The others run anywhere:
the refusal of other devices, ``Snapshot.staged()`` for host-only snapshots, pinned needs on
a torch without CUDA, and the snapshot's staging logic (pooling, waiting, cancellation,
failures, the manager's and the saver's waits) driven through ``CpuStandIn``: a stand-in for
a device this machine does not have, which takes CPU tensors as its "device" tensors. Those
are not CUDA tests: they check asyncckpt's bookkeeping, not torch's streams.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest
from support import all_tasks_blocked, until

from asyncckpt import CheckpointManager, Saver
from asyncckpt._checkpoint._snapshot import BufferNeed, PinnedBuffer, SnapshotPool, make_buffers
from asyncckpt._tree import DeviceTensor, host_array, host_tensor

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from asyncckpt.testing import FaultyStorage

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

pytestmark = pytest.mark.anyio

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the project's machines have none)"
)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")

# The dtypes the issue names, with the integer dtype their bits are compared through.
BIT_DTYPES = [
    (torch.float32, torch.int32),
    (torch.bfloat16, torch.int16),
    (torch.float8_e4m3fn, torch.uint8),
]


def random_bits(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
    """A CPU tensor of ``dtype`` holding random bit patterns (nan payloads included)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = int(np.prod(shape)) * itemsize
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
        .view(dtype)
        .reshape(shape)
    )


class CpuStandIn:
    """A stand-in for a CUDA device this machine does not have (not a CUDA test).

    It plays ``CudaCopier``'s part for CPU tensors: ``device_types`` is ``{"cpu"}``, its
    "pinned" buffers are ordinary memory made the same way (``host_array``), ``start()``
    copies at once, as a device ordered after the trainer's work would, and the wait it
    returns blocks in its worker thread until the test opens ``gate`` (open by default),
    then raises ``fail`` if set.

    Calling it returns itself and ``pinned`` is static: patched in for ``CudaCopier``,
    ``SnapshotPool()`` and ``make_buffers`` both reach it (the ``stand_in`` fixture).
    """

    device_types = frozenset({"cpu"})

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.reached = threading.Event()
        self.fail: Exception | None = None
        self.started = 0
        self.waited = 0

    def __call__(self) -> CpuStandIn:
        return self

    @staticmethod
    def pinned(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        return host_array(shape, dtype, pinned=False)

    def start(
        self, copies: Sequence[tuple[np.ndarray[Any, Any], DeviceTensor]]
    ) -> Callable[[], None]:
        self.started += 1
        for buffer, leaf in copies:
            host_tensor(buffer, leaf.tensor).copy_(leaf.tensor)

        def wait() -> None:
            self.reached.set()
            if not self.gate.wait(10):
                raise TimeoutError("the test never opened the stand-in's gate")
            self.waited += 1
            if self.fail is not None:
                raise self.fail

        return wait


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> CpuStandIn:
    """Every SnapshotPool made during the test (the manager's and the saver's too) stages
    CPU tensors through one ``CpuStandIn``, as it would stage CUDA tensors."""
    device = CpuStandIn()
    monkeypatch.setattr("asyncckpt._checkpoint._snapshot.CudaCopier", device)
    return device


def bits_of(array: np.ndarray[Any, Any]) -> bytes:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()


def tensor_bits(tensor: Any) -> bytes:
    return bytes(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


# -- runs anywhere ----------------------------------------------------------------------------


def test_a_meta_tensor_is_refused_naming_its_path_and_what_to_do() -> None:
    tree = {"model": {"w": torch.empty(3, device="meta")}}
    with pytest.raises(TypeError, match=r"meta tensor at model/w: a meta tensor holds no data"):
        SnapshotPool().take(tree)
    with pytest.raises(TypeError, match=r"materialize it first"):
        SnapshotPool().plan_reserve(tree, 1)


async def test_a_host_only_snapshot_is_staged_at_once_without_a_checkpoint() -> None:
    pool = SnapshotPool()
    snapshot = pool.take({"a": np.arange(4.0), "t": torch.arange(3)})
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        await snapshot.staged()  # a checkpoint here would raise the cancellation
        reached = True
    assert reached
    snapshot.release()
    assert pool.free_sets == 1


@no_cuda
def test_pinned_buffers_need_cuda_and_a_torch_without_it_says_so() -> None:
    # Only a CUDA tensor asks for a pinned buffer, and a torch without CUDA cannot hold one:
    # asked anyway, make_buffers says why instead of handing back pageable memory.
    need = BufferNeed(("w",), (4,), np.dtype(np.float32), pinned=True)
    with pytest.raises(RuntimeError, match=r"pinned host memory needs a CUDA device"):
        make_buffers([need])


def test_host_tensor_takes_only_arrays_host_array_made() -> None:
    with pytest.raises(TypeError, match=r"arrays that host_array\(\) made"):
        host_tensor(np.zeros(4, np.float32), torch.zeros(4))


@pytest.mark.parametrize(("dtype", "bits"), BIT_DTYPES, ids=["float32", "bfloat16", "float8"])
async def test_stand_in_device_tensors_are_copied_bit_for_bit(dtype: Any, bits: Any) -> None:
    device = CpuStandIn()
    tensor = random_bits(dtype, (16, 8))
    snapshot = SnapshotPool(copier=device).take({"w": tensor})
    await snapshot.staged()
    (leaf,) = snapshot.leaves
    assert snapshot.spec == ["d", [["w", ["T", 0]]]]
    assert leaf.array.shape == (16, 8)
    assert leaf.array.dtype.name == str(dtype).removeprefix("torch.")
    assert bits_of(leaf.array) == tensor_bits(tensor)
    assert (device.started, device.waited) == (1, 1)


async def test_stand_in_views_are_copied_resolved_and_contiguous() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tree = {"t": base.t(), "c": torch.tensor([1 + 2j, 3 - 4j]).conj(), "s": torch.tensor(5)}
    snapshot = SnapshotPool(copier=CpuStandIn()).take(tree)
    await snapshot.staged()
    arrays = {leaf.path: leaf.array for leaf in snapshot.leaves}
    np.testing.assert_array_equal(arrays[("t",)], base.t().numpy())
    np.testing.assert_array_equal(arrays[("c",)], np.array([1 - 2j, 3 + 4j], np.complex64))
    assert arrays[("s",)].shape == ()
    assert arrays[("s",)] == 5


async def test_stand_in_snapshot_keeps_the_state_of_its_instant() -> None:
    live = torch.zeros(1000)
    snapshot = SnapshotPool(copier=CpuStandIn()).take({"w": live, "n": np.ones(3)})
    live.add_(1)  # the trainer's next step
    await snapshot.staged()
    assert not snapshot.leaves[0].array.any()


async def test_stand_in_pinned_buffers_are_pooled_and_reused() -> None:
    device = CpuStandIn()
    pool = SnapshotPool(copier=device)
    tree = {"w": torch.ones(64, 64), "b": random_bits(torch.bfloat16, (7,)), "n": np.zeros(5)}
    first = pool.take(tree)
    await first.staged()
    made = (pool.buffers_allocated, pool.bytes_allocated)
    assert made == (3, 64 * 64 * 4 + 7 * 2 + 5 * 8)
    first.release()
    tree["w"].add_(1)
    second = pool.take(tree)
    await second.staged()
    assert (pool.buffers_allocated, pool.bytes_allocated) == made  # nothing new
    np.testing.assert_array_equal(second.leaves[0].array, np.full((64, 64), 2.0, np.float32))
    second.release()


async def test_stand_in_reserve_plans_pinned_buffers_that_take_warm_then_uses() -> None:
    device = CpuStandIn()
    pool = SnapshotPool(copier=device)
    tree = {"w": torch.ones(8), "n": np.zeros(3)}
    (plan,) = pool.plan_reserve(tree, 1)
    assert plan == [
        BufferNeed(("w",), (8,), np.dtype(np.float32), pinned=True),
        BufferNeed(("n",), (3,), np.dtype(np.float64)),
    ]
    made = make_buffers(plan, device.pinned)
    assert isinstance(made[("w",)], PinnedBuffer)
    assert not isinstance(made[("n",)], PinnedBuffer)
    pool.count_made(made)
    pool.stock(made, index=0)
    assert pool.plan_reserve(tree, 1) == [[]]
    snapshot = pool.take_warm(tree, [])
    assert snapshot is not None
    await snapshot.staged()
    assert pool.buffers_allocated == 2  # the reserved ones, nothing more
    np.testing.assert_array_equal(snapshot.leaves[0].array, np.ones(8, np.float32))


async def test_stand_in_take_warm_lists_missing_pinned_buffers_and_starts_no_copy() -> None:
    device = CpuStandIn()
    pool = SnapshotPool(copier=device)
    missing: list[BufferNeed] = []
    assert pool.take_warm({"w": torch.ones(4)}, missing) is None
    assert missing == [BufferNeed(("w",), (4,), np.dtype(np.float32), pinned=True)]
    assert device.started == 0
    made = make_buffers(missing, device.pinned)
    pool.count_made(made)
    pool.stock(made)
    snapshot = pool.take_warm({"w": torch.ones(4)}, [])
    assert snapshot is not None
    await snapshot.staged()
    assert pool.buffers_allocated == 1


def test_a_pageable_buffer_never_serves_a_device_copy_but_a_pinned_one_serves_a_host_copy() -> None:
    pool = SnapshotPool(max_free_sets=3, copier=CpuStandIn())
    as_array, as_tensor = {"w": np.zeros(4, np.float32)}, {"w": torch.zeros(4)}
    pool.take(as_array).release()
    (plan,) = pool.plan_reserve(as_tensor, 1)
    assert plan == [BufferNeed(("w",), (4,), np.dtype(np.float32), pinned=True)]
    # The pageable buffer, of no use to a device copy, makes way for the pinned one...
    pool.stock(make_buffers(plan, CpuStandIn.pinned))
    assert pool.free_sets == 1
    assert pool.plan_reserve(as_tensor, 1) == [[]]
    # ...which serves a host copy too; a pinned set coming back beside it is kept apart.
    assert pool.plan_reserve(as_array, 1) == [[]]
    pool.stock(make_buffers(plan, CpuStandIn.pinned))
    assert pool.free_sets == 2


async def test_stand_in_cancelled_wait_still_waits_for_the_copies_then_reuses_them() -> None:
    # The copies are in flight when the save is cancelled: it returns only once they have
    # landed, so the buffers can go back to the pool and the next snapshot reuses them.
    device = CpuStandIn()
    device.gate.clear()
    pool = SnapshotPool(copier=device)
    tree = {"w": torch.ones(16)}
    snapshot = pool.take(tree)
    finished = anyio.Event()
    scope = anyio.CancelScope()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def save() -> None:
                with scope:
                    try:
                        await snapshot.staged()
                    finally:
                        finished.set()

            tg.start_soon(save)
            await until(device.reached.is_set)
            scope.cancel()
            await all_tasks_blocked()
            assert not finished.is_set()  # cancelled, and still waiting for the device
            device.gate.set()
    assert scope.cancelled_caught  # then the cancellation surfaced
    assert device.waited == 1
    snapshot.release()
    pool.take(tree).release()
    assert pool.buffers_allocated == 1


async def test_stand_in_failed_copies_drop_their_buffers() -> None:
    device = CpuStandIn()
    device.fail = RuntimeError("CUDA error: an illegal memory access was encountered")
    pool = SnapshotPool(copier=device)
    tree = {"w": torch.ones(16), "n": np.zeros(2)}
    snapshot = pool.take(tree)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        await snapshot.staged()
    snapshot.release()
    device.fail = None
    again = pool.take(tree)
    await again.staged()
    # The host buffer came back; the pinned one, which the device may still write, did not.
    assert pool.buffers_allocated == 3


def test_stand_in_snapshot_released_before_staged_drops_its_pinned_buffers() -> None:
    pool = SnapshotPool(copier=CpuStandIn())
    tree = {"w": torch.ones(16), "n": np.zeros(2)}
    pool.take(tree).release()  # its copies were never seen to land
    pool.take(tree).release()
    assert pool.buffers_allocated == 3


async def test_stand_in_rejected_tree_keeps_pinned_buffers_for_the_next_save() -> None:
    pool = SnapshotPool(copier=CpuStandIn())
    tree: dict[str, Any] = {"w": torch.ones(16)}
    first = pool.take(tree)
    await first.staged()
    first.release()
    with pytest.raises(TypeError, match=r"cannot save object at x"):
        pool.take({**tree, "x": object()})
    again = pool.take(tree)  # nothing was started for the rejected tree: its buffer came back
    await again.staged()
    assert pool.buffers_allocated == 1


async def test_stand_in_saver_waits_for_the_copies_and_round_trips(
    stand_in: CpuStandIn, tmp_path: Path
) -> None:
    state = {"w": random_bits(torch.bfloat16, (32,)), "f8": random_bits(torch.float8_e5m2, (9,))}
    path = await Saver().save(state, str(tmp_path / "model.ckpt"), global_step=1)
    assert (stand_in.started, stand_in.waited) == (1, 1)
    restored = await Saver().restore(path)
    for key, tensor in state.items():
        assert restored[key].dtype == tensor.dtype
        assert tensor_bits(restored[key]) == tensor_bits(tensor)


async def test_stand_in_manager_save_returns_once_staged_and_counts_it_as_stall(
    stand_in: CpuStandIn, tmp_path: Path
) -> None:
    stand_in.gate.clear()
    state = {"w": torch.ones(256)}
    async with CheckpointManager(tmp_path, max_pending=0) as manager:
        returned = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def save() -> None:
                assert await manager.save(state, 1)
                returned.set()

            tg.start_soon(save)
            await until(stand_in.reached.is_set)
            await all_tasks_blocked()
            began = time.perf_counter()
            assert not returned.is_set()
            assert manager.statistics().pending == 0  # not queued before the copy landed
            waited = time.perf_counter() - began
            stand_in.gate.set()
        await manager.wait()
        stats = manager.statistics()
        restored = await manager.restore()
    assert stats.written == 1
    assert stats.last_stall_secs is not None
    assert stats.last_stall_secs >= waited
    np.testing.assert_array_equal(restored["w"], torch.ones(256))


async def test_stand_in_manager_save_cancelled_during_the_copy_is_not_taken(
    stand_in: CpuStandIn, tmp_path: Path
) -> None:
    stand_in.gate.clear()
    state = {"w": torch.ones(64)}
    async with CheckpointManager(tmp_path, max_pending=0) as manager:
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:

            async def save() -> None:
                with scope:
                    await manager.save(state, 1)

            tg.start_soon(save)
            await until(stand_in.reached.is_set)
            scope.cancel()
            await all_tasks_blocked()
            stand_in.gate.set()
        assert scope.cancelled_caught
        assert manager.statistics().pending == 0
        assert await manager.save(state, 2)  # into the cancelled save's buffer, landed
        await manager.wait()
        stats = manager.statistics()
        steps = manager.all_steps()
    assert steps == [2]
    assert stats.buffers_allocated == 1


async def test_stand_in_manager_save_raises_what_the_device_reports(
    stand_in: CpuStandIn, tmp_path: Path
) -> None:
    stand_in.fail = RuntimeError("CUDA error: unspecified launch failure")
    async with CheckpointManager(tmp_path) as manager:
        with pytest.raises(RuntimeError, match="unspecified launch failure"):
            await manager.save({"w": torch.ones(8)}, 1)
        stand_in.fail = None
        assert await manager.save({"w": torch.ones(8)}, 2)
        await manager.wait()
        stats = manager.statistics()
    assert (stats.written, stats.pending) == (1, 0)
    assert stats.buffers_allocated == 2  # the failed copy's buffer was dropped


async def test_stand_in_skip_rechecks_the_queue_after_the_copy(
    stand_in: CpuStandIn, storage: FaultyStorage, tmp_path: Path
) -> None:
    # While one save waits for its tensors to come off the device, another fills the queue:
    # under "skip" the first is then dropped, never swapped for the queued one.
    stall = storage.stall("fsync", match="model.ckpt-2")
    stand_in.gate.clear()
    async with CheckpointManager(
        tmp_path, max_pending=0, policy="skip", storage=storage
    ) as manager:
        results: dict[str, bool] = {}
        async with anyio.create_task_group() as tg:

            async def save_tensors() -> None:
                results["tensors"] = await manager.save({"w": torch.ones(4)}, 1)

            tg.start_soon(save_tensors)
            await until(stand_in.reached.is_set)
            assert await manager.save({"n": np.ones(4)}, 2)  # host only: queued at once
            await stall.wait_reached()
            stand_in.gate.set()
        stats = manager.statistics()
        stall.release()
        await manager.wait()
        steps = manager.all_steps()
    assert results == {"tensors": False}
    assert (stats.skipped, stats.replaced) == (1, 0)
    assert steps == [2]


async def test_stand_in_block_with_a_callable_step_takes_a_new_snapshot_after_the_copy(
    stand_in: CpuStandIn, storage: FaultyStorage, tmp_path: Path
) -> None:
    # Under "block" with a callable step, a snapshot whose copy ended with the queue full
    # is released; the save waits for room and labels a new snapshot at its own instant.
    stall = storage.stall("fsync", match="model.ckpt-5")
    stand_in.gate.clear()
    live = torch.zeros(4)
    version = [1]
    async with CheckpointManager(tmp_path, max_pending=0, storage=storage) as manager:
        await manager.reserve({"w": live})  # its pinned buffer made by the stand-in too
        assert manager.statistics().buffers_allocated == 1
        async with anyio.create_task_group() as tg:

            async def save_tensors() -> None:
                assert await manager.save({"w": live}, lambda: version[0])

            tg.start_soon(save_tensors)
            await until(stand_in.reached.is_set)
            assert await manager.save({"n": np.ones(4)}, 5)
            await stall.wait_reached()
            stand_in.gate.set()
            await all_tasks_blocked()  # waiting for room now
            live.fill_(7)
            version[0] = 7
            stall.release()
        await manager.wait()
        steps = manager.all_steps()
        restored = await manager.restore(step=7)
    assert steps == [5, 7]
    np.testing.assert_array_equal(restored["w"], torch.full((4,), 7.0))
    assert stand_in.started == 2


# -- needs a CUDA device ----------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(("dtype", "bits"), BIT_DTYPES, ids=["float32", "bfloat16", "float8"])
async def test_cuda_tensors_round_trip_bit_for_bit(tmp_path: Path, dtype: Any, bits: Any) -> None:
    tensor = random_bits(dtype, (256, 33)).cuda()
    path = await Saver().save({"w": tensor, "t": tensor.t()}, str(tmp_path / "m.ckpt"), 1)
    restored = await Saver().restore(path)
    assert restored["w"].dtype == dtype
    assert torch.equal(restored["w"].view(bits), tensor.cpu().view(bits))
    assert torch.equal(restored["t"].view(bits), tensor.t().contiguous().cpu().view(bits))


@needs_cuda
async def test_cuda_buffers_are_pinned_and_reused_on_the_next_save() -> None:
    pool = SnapshotPool()
    state = {"a": torch.randn(1024, device="cuda"), "b": random_bits(torch.bfloat16, (8, 8))}
    state["b"] = state["b"].cuda()
    first = pool.take(state)
    await first.staged()
    for leaf in first.leaves:
        assert torch.from_numpy(leaf.array.reshape(-1).view(np.uint8)).is_pinned()
    made = (pool.buffers_allocated, pool.bytes_allocated)
    first.release()
    state["a"].mul_(2)
    second = pool.take(state)
    await second.staged()
    assert (pool.buffers_allocated, pool.bytes_allocated) == made  # zero new allocations
    np.testing.assert_array_equal(second.leaves[0].array, state["a"].cpu().numpy())
    second.release()


@needs_cuda
async def test_cuda_update_right_after_save_does_not_reach_the_snapshot(tmp_path: Path) -> None:
    w = torch.zeros(16 * 2**20, device="cuda")  # 64 MiB: the copy takes a while
    async with CheckpointManager(tmp_path, max_pending=0) as manager:
        torch.cuda._sleep(50_000_000)  # the trainer's queued work, still running...
        w.fill_(2.0)  # ...and its last update before the snapshot, which it must see
        assert await manager.save({"w": w}, 1)
        w.add_(1.0)  # optimizer.step() right after save() returns
        await manager.wait()
        restored = await manager.restore()
        torch.cuda.synchronize()
    assert torch.equal(restored["w"], torch.full((16 * 2**20,), 2.0))
    assert torch.equal(w.cpu(), torch.full((16 * 2**20,), 3.0))


@needs_cuda
async def test_cuda_restore_fills_cuda_tensors_in_place(tmp_path: Path) -> None:
    saved = {"w": torch.randn(64, 64, device="cuda"), "b": random_bits(torch.bfloat16, (9,))}
    saved["b"] = saved["b"].cuda()
    async with CheckpointManager(tmp_path) as manager:
        await manager.save(saved, 1)
        await manager.wait()
        live = {"w": torch.zeros(64, 64, device="cuda"), "b": torch.zeros(9, device="cuda")}
        live["b"] = live["b"].to(torch.bfloat16)
        pointers = {key: tensor.data_ptr() for key, tensor in live.items()}
        restored = await manager.restore(into=live)
    for key in ("w", "b"):
        assert restored[key] is live[key]
        assert live[key].device.type == "cuda"
        assert live[key].data_ptr() == pointers[key]
        assert tensor_bits(live[key]) == tensor_bits(saved[key])
