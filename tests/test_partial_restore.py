"""Partial restores: ``paths=`` reads only the named subtrees, ``partial=True`` only what
``into=`` holds; unrequested arrays' bytes are neither read nor checked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from asyncckpt import CheckpointCorruptedError, CheckpointManager, Saver

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

# Distinct byte patterns, so a test can find an array's bytes in the file.
_SKIPPED_BYTE = 0x5A


def state() -> dict[str, Any]:
    return {
        "model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3)},
        "opt": {"state": {"m": np.full(4, 2.0), "v": np.full(4, 3.0)}, "lr": 0.1},
        "layers": [{"w": np.full(5, 10, np.int64)}, {"w": np.full(5, 11, np.int64)}],
        "skipped": np.full(4096, _SKIPPED_BYTE, np.uint8),
        "step": 7,
    }


async def saved(tmp_path: Path, tree: dict[str, Any] | None = None) -> str:
    return await Saver().save(state() if tree is None else tree, str(tmp_path / "ckpt"), 1)


def damage_skipped(path: str) -> None:
    """Flip one byte inside the ``skipped`` array's data."""
    with open(path, "r+b") as file:
        data = file.read()
        at = data.find(bytes([_SKIPPED_BYTE]) * 4096) + 100
        assert at >= 100
        file.seek(at)
        file.write(bytes([_SKIPPED_BYTE ^ 0xFF]))


async def test_paths_of_a_nested_dict(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    tree = await Saver().restore(path, paths=["opt/state"])
    assert list(tree) == ["opt"]
    assert list(tree["opt"]) == ["state"]
    np.testing.assert_array_equal(tree["opt"]["state"]["m"], np.full(4, 2.0))
    np.testing.assert_array_equal(tree["opt"]["state"]["v"], np.full(4, 3.0))


async def test_a_list_item_comes_back_keyed_by_its_index(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    tree = await Saver().restore(path, paths=["layers/1/w"])
    assert list(tree) == ["layers"]
    assert list(tree["layers"]) == [1]
    np.testing.assert_array_equal(tree["layers"][1]["w"], np.full(5, 11))


async def test_several_paths_and_a_path_inside_another(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    tree = await Saver().restore(path, paths=["model", "step", "model/w", "layers", "opt/lr"])
    assert set(tree) == {"model", "step", "layers", "opt"}
    assert tree["step"] == 7
    assert tree["opt"] == {"lr": 0.1}
    assert isinstance(tree["layers"], list)  # a whole list named: the list itself
    assert len(tree["layers"]) == 2
    np.testing.assert_array_equal(tree["model"]["w"], state()["model"]["w"])


async def test_a_missing_path_raises_key_error_listing_top_level_keys(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    with pytest.raises(KeyError, match=r"'model/nope'.*top-level keys.*'opt'") as info:
        await Saver().restore(path, paths=["model/nope"])
    assert "under 'model'" in str(info.value)
    with pytest.raises(KeyError, match="'layers/2'"):
        await Saver().restore(path, paths=["layers/2"])


async def test_paths_must_be_a_list_of_paths(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    with pytest.raises(TypeError, match=r"paths=\['model'\]"):
        await Saver().restore(path, paths="model")
    with pytest.raises(ValueError, match="paths= is empty"):
        await Saver().restore(path, paths=[])
    with pytest.raises(ValueError, match="pass into= too"):
        await Saver().restore(path, partial=True)


@pytest.mark.parametrize("mmap", [False, True])
async def test_unrequested_arrays_are_not_read(tmp_path: Path, mmap: bool) -> None:
    path = await saved(tmp_path)
    damage_skipped(path)
    tree = await Saver().restore(path, paths=["model", "layers/0", "step"], mmap=mmap)
    np.testing.assert_array_equal(tree["model"]["b"], np.ones(3))
    np.testing.assert_array_equal(tree["layers"][0]["w"], np.full(5, 10))
    with pytest.raises(CheckpointCorruptedError, match="skipped"):
        await Saver().restore(path, mmap=mmap)
    with pytest.raises(CheckpointCorruptedError, match="skipped"):
        await Saver().restore(path, paths=["skipped"], mmap=mmap)


async def test_mmap_with_paths_gives_read_only_views(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    tree = await Saver().restore(path, paths=["opt/state/m"], mmap=True)
    m = tree["opt"]["state"]["m"]
    assert not m.flags.writeable
    np.testing.assert_array_equal(m, np.full(4, 2.0))


async def test_paths_with_into_fill_only_those_subtrees(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    into: dict[str, Any] = {
        "model": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3)},
        "other": 1,
    }
    w = into["model"]["w"]
    tree = await Saver().restore(path, into, paths=["model"])
    assert tree["model"] is into["model"]
    assert tree["model"]["w"] is w
    np.testing.assert_array_equal(w, state()["model"]["w"])
    with pytest.raises(ValueError, match="into= has no item at opt"):
        await Saver().restore(path, into, paths=["opt/state"])
    with pytest.raises(ValueError, match="keys differ"):
        await Saver().restore(path, {"model": {"w": w}}, paths=["model"])


async def test_partial_fills_only_what_into_holds(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    damage_skipped(path)
    into = {
        "model": {"w": np.zeros((2, 3), np.float32)},
        "layers": [{"w": np.zeros(5, np.int64)}, {"w": np.zeros(5, np.int64)}],
    }
    tree = await Saver().restore(path, into, partial=True)
    assert tree is into
    assert list(tree["model"]) == ["w"]
    np.testing.assert_array_equal(into["model"]["w"], state()["model"]["w"])
    np.testing.assert_array_equal(into["layers"][1]["w"], np.full(5, 11))


async def test_partial_refuses_entries_the_checkpoint_lacks(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    into: dict[str, Any] = {
        "model": {"w": np.zeros((2, 3), np.float32), "extra": np.zeros(1)},
        "new": 1,
    }
    with pytest.raises(ValueError, match=r"\['new', 'model/extra'\]"):
        await Saver().restore(path, into, partial=True)
    np.testing.assert_array_equal(into["model"]["w"], np.zeros((2, 3)))  # nothing was read


async def test_partial_with_paths(tmp_path: Path) -> None:
    path = await saved(tmp_path)
    into = {"opt": {"state": {"v": np.zeros(4)}}}
    tree = await Saver().restore(path, into, paths=["opt/state"], partial=True)
    assert tree == {"opt": {"state": into["opt"]["state"]}}
    np.testing.assert_array_equal(into["opt"]["state"]["v"], np.full(4, 3.0))


async def test_torch_tensors_under_a_requested_path(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tree = {"model": {"w": torch.arange(4.0), "b": torch.ones(2)}, "other": torch.zeros(3)}
    path = await saved(tmp_path, tree)
    restored = await Saver().restore(path, paths=["model/w"])
    assert isinstance(restored["model"]["w"], torch.Tensor)
    assert torch.equal(restored["model"]["w"], torch.arange(4.0))
    live = torch.zeros(4)
    filled = await Saver().restore(path, {"model": {"w": live}}, partial=True, paths=["model"])
    assert filled["model"]["w"] is live
    assert torch.equal(live, torch.arange(4.0))


async def test_through_the_checkpoint_manager(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        await manager.save(state(), 1)
        tree = await manager.restore(paths=["layers/0/w", "step"])
        assert tree["step"] == 7
        np.testing.assert_array_equal(tree["layers"][0]["w"], np.full(5, 10))
        into = {"opt": {"state": {"m": np.zeros(4)}}}
        assert await manager.restore(1, into, partial=True) is into
        np.testing.assert_array_equal(into["opt"]["state"]["m"], np.full(4, 2.0))
        with pytest.raises(KeyError, match="'nope'"):
            await manager.restore(paths=["nope"])
