"""Framework state (docs/FRAMEWORKS.md): ml_dtypes' dtypes, torch tensors and objects, jax
arrays, random generators, and container types taken from ``into=``.

Round trips go through the public ``Saver`` and ``CheckpointManager`` into ``tmp_path``, with
real torch, jax and ml_dtypes; a package is hidden with ``sys.modules[name] = None``, which
makes ``import name`` fail as if it were not installed.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pytest

from asyncckpt import CheckpointError, CheckpointFormatError, CheckpointManager, Saver
from asyncckpt._checkpoint import read_header_sync, verify_file
from asyncckpt._checkpoint._format import PRELUDE_SIZE, decode_header, decode_prelude
from asyncckpt._checkpoint._snapshot import SnapshotPool
from asyncckpt._core._crc32c import crc32c
from asyncckpt._storage import LocalStorage
from asyncckpt._tree import EXTENSION_ITEMSIZES

ml_dtypes = pytest.importorskip("ml_dtypes")
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

pytestmark = pytest.mark.anyio

CLOCK = 1_700_000_000.0


async def _round_trip(
    tmp_path: Path, tree: Any, *, into: Any = None, use_mmap: bool = False, raw: bool = False
) -> Any:
    saver = Saver(max_to_keep=1, clock=lambda: CLOCK)
    path = await saver.save(tree, tmp_path / "model.ckpt", global_step=1)
    return await saver.restore(path, into=into, mmap=use_mmap, raw_dtypes=raw)


async def _save(tmp_path: Path, tree: Any, step: int = 1) -> str:
    return await Saver(clock=lambda: CLOCK).save(tree, tmp_path / "model.ckpt", global_step=step)


def _header_fields(path: str) -> dict[str, Any]:
    """The header of a checkpoint file as msgpack decodes it (no validation)."""
    data = Path(path).read_bytes()
    header_len, _crc = decode_prelude(data[:PRELUDE_SIZE], len(data), path)
    fields: dict[str, Any] = msgpack.unpackb(
        data[PRELUDE_SIZE : PRELUDE_SIZE + header_len], raw=False
    )
    return fields


def _header_dtypes(path: str) -> list[Any]:
    """The dtype field of every array entry, as the file spells it."""
    return [entry[0] for entry in _header_fields(path)["arrays"]]


def _tensor_bits(tensor: Any) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


# -- ml_dtypes' dtypes -----------------------------------------------------------------------

INSTALLED_NAMES = [name for name in EXTENSION_ITEMSIZES if hasattr(ml_dtypes, name)]


def _ml_array(name: str) -> np.ndarray[Any, Any]:
    """Every byte value, seen as the type (nan payloads and unused bits included), 2-D."""
    bits = (np.arange(256 * EXTENSION_ITEMSIZES[name]) % 256).astype(np.uint8)
    array: np.ndarray[Any, Any] = bits.view(getattr(ml_dtypes, name)).reshape(-1, 2)
    return array


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("name", INSTALLED_NAMES)
async def test_ml_dtypes_round_trip_under_their_names(
    tmp_path: Path, name: str, use_mmap: bool
) -> None:
    array = _ml_array(name)
    scalar = array.reshape(-1)[3]
    path = await _save(tmp_path, {"x": array, "s": scalar})
    assert _header_dtypes(path) == [name, name]
    restored = await Saver().restore(path, mmap=use_mmap)
    assert restored["x"].dtype == array.dtype
    assert restored["x"].shape == array.shape
    assert restored["x"].tobytes() == array.tobytes()
    assert type(restored["s"]) is type(scalar)
    assert restored["s"].tobytes() == scalar.tobytes()


def test_the_allow_list_covers_every_ml_dtypes_dtype() -> None:
    # A dtype ml_dtypes adds would otherwise be refused on save; this says when to add it.
    names = {
        n
        for n in dir(ml_dtypes)
        if isinstance(getattr(ml_dtypes, n), type) and issubclass(getattr(ml_dtypes, n), np.generic)
    }
    assert names <= set(EXTENSION_ITEMSIZES)
    for name in {"bfloat16", "float8_e4m3fn", "float8_e5m2", "int4", "uint4", "int2"}:
        assert name in INSTALLED_NAMES


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "int4", "complex32"])
async def test_raw_dtypes_gives_the_bits_as_unsigned_ints(tmp_path: Path, name: str) -> None:
    array = _ml_array(name)
    restored = await _round_trip(tmp_path, {"x": array, "plain": np.arange(3.0)}, raw=True)
    assert restored["x"].dtype == np.dtype(f"<u{EXTENSION_ITEMSIZES[name]}")
    assert restored["x"].tobytes() == array.tobytes()
    assert restored["plain"].dtype == np.float64


async def test_without_ml_dtypes_a_restore_names_the_dtype_and_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await _save(tmp_path, {"w": np.ones(3, ml_dtypes.bfloat16)})
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(CheckpointFormatError, match="bfloat16") as info:
        await Saver().restore(path)
    assert "pip install ml_dtypes" in str(info.value)
    assert "raw_dtypes=True" in str(info.value)
    assert "'w'" in str(info.value)
    with pytest.raises(CheckpointFormatError, match="pip install ml_dtypes"):
        await Saver().restore(path, mmap=True)
    raw = await Saver().restore(path, raw_dtypes=True)
    assert raw["w"].dtype == np.uint16
    assert raw["w"].tobytes() == np.ones(3, ml_dtypes.bfloat16).tobytes()
    # Checking a file's bytes and reading its header need no dtype at all.
    storage = LocalStorage()
    assert verify_file(storage, path).arrays[0].extension == "bfloat16"
    assert read_header_sync(storage, path).arrays[0].dtype == np.uint16


async def test_a_missing_package_never_falls_back_to_an_older_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file is fine, only this machine lacks ml_dtypes: "fallback" must not skip it (a
    # manager would even unlist it).
    await _save(tmp_path, {"w": np.zeros(2, np.float32)}, step=1)
    newest = await _save(tmp_path, {"w": np.ones(2, ml_dtypes.bfloat16)}, step=2)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(CheckpointFormatError, match="pip install ml_dtypes"):
        await Saver().restore(newest, on_corrupt="fallback")
    async with CheckpointManager(tmp_path, on_corrupt="fallback") as manager:
        with pytest.raises(CheckpointFormatError, match="pip install ml_dtypes"):
            await manager.restore()
        assert manager.all_steps() == [1, 2]
        raw = await manager.restore(raw_dtypes=True)
        assert raw["w"].dtype == np.uint16


async def test_an_unknown_package_dtype_is_refused_on_save(tmp_path: Path) -> None:
    record = np.zeros(2, [("a", ml_dtypes.bfloat16), ("b", "<f4")])
    with pytest.raises(TypeError, match="structured dtype at r: its bfloat16 field"):
        await _save(tmp_path, {"r": record})


async def test_old_spellings_of_float8_e5m2_read_as_float8_e5m2(tmp_path: Path) -> None:
    # Before the names, float8_e5m2 went into the header as numpy's dtype.str, "<f1", which
    # numpy cannot parse: such files now read as what they held.
    path = await _save(tmp_path, {"x": np.ones(4, ml_dtypes.float8_e5m2)})
    fields = _header_fields(path)
    fields["arrays"][0][0] = "<f1"
    old = msgpack.packb(fields, use_bin_type=True)
    header = decode_header(old, crc32c(old), fields["file_size"], "old")
    assert header.arrays[0].dtype == np.dtype(ml_dtypes.float8_e5m2)
    assert header.arrays[0].extension == "float8_e5m2"


@pytest.mark.parametrize("tag", ["T", "J"])
def test_a_framework_leaf_of_a_non_numeric_dtype_is_a_format_error(tag: str) -> None:
    fields = {
        "arrays": [["<M8[s]", [1], 64, 8, 0]],
        "file_size": 72,
        "metadata": {},
        "step": None,
        "time": 1.0,
        "tree": [tag, 0],
    }
    packed = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(CheckpointFormatError, match="not numeric"):
        decode_header(packed, crc32c(packed), 72, "x")


# -- torch tensors ---------------------------------------------------------------------------

TORCH_DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "bool",
    "complex64",
    "float8_e4m3fn",
    "float8_e5m2",
]


def _tensor(dtype_name: str) -> Any:
    dtype = getattr(torch, dtype_name)
    if dtype.is_floating_point or dtype.is_complex:
        values = torch.linspace(-3, 3, 12).reshape(3, 4)
        if dtype.is_complex:
            values = torch.complex(values, -values)
        return values.to(dtype)
    if dtype == torch.bool:
        return torch.arange(12).reshape(3, 4) % 3 == 0
    return torch.arange(12).reshape(3, 4).to(dtype)


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("dtype_name", TORCH_DTYPES)
async def test_tensors_come_back_as_tensors_bit_for_bit(
    tmp_path: Path, dtype_name: str, use_mmap: bool
) -> None:
    tensor = _tensor(dtype_name)
    restored = await _round_trip(tmp_path, {"t": tensor, "s": tensor[0, 0]}, use_mmap=use_mmap)
    for key, expected in [("t", tensor), ("s", tensor[0, 0])]:
        got = restored[key]
        assert isinstance(got, torch.Tensor)
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        assert _tensor_bits(got) == _tensor_bits(expected)
    # A writable tensor even from a mapped file (and no warning from torch either).
    restored["t"].reshape(-1).view(torch.uint8).fill_(0)


async def test_parameters_views_and_conjugates_save_as_their_values(tmp_path: Path) -> None:
    parameter = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    base = torch.arange(20.0).reshape(4, 5)
    tree = {"p": parameter, "view": base.T[1:], "conj": torch.tensor([1 + 2j]).conj()}
    restored = await _round_trip(tmp_path, tree)
    assert torch.equal(restored["p"], parameter.detach())
    assert not restored["p"].requires_grad
    assert torch.equal(restored["view"], base.T[1:])
    assert torch.equal(restored["conj"], torch.tensor([1 - 2j]))


def test_a_snapshot_copies_tensors() -> None:
    tensor = torch.zeros(1000)
    snapshot = SnapshotPool().take({"t": tensor})
    tensor.fill_(7)
    (leaf,) = snapshot.leaves
    assert not leaf.array.any()
    assert not np.shares_memory(leaf.array, tensor.numpy())


async def test_restore_into_tensors_fills_them_in_place(tmp_path: Path) -> None:
    saved = {"w": torch.randn(3, 4), "b": torch.randn(4, dtype=torch.float64).to(torch.bfloat16)}
    w, b = torch.zeros(3, 4), torch.zeros(4, dtype=torch.bfloat16)
    parameter = torch.nn.Parameter(torch.zeros(3, 4))
    restored = await _round_trip(tmp_path, saved, into={"w": w, "b": b})
    assert restored["w"] is w
    assert restored["b"] is b
    assert torch.equal(w, saved["w"])
    assert _tensor_bits(b) == _tensor_bits(saved["b"])
    again = await _round_trip(tmp_path, saved, into={"w": parameter, "b": b}, use_mmap=True)
    assert again["w"] is parameter
    assert parameter.requires_grad
    assert torch.equal(parameter.detach(), saved["w"])


async def test_restore_into_numpy_and_tensor_leaves_takes_into_s_kind(tmp_path: Path) -> None:
    saved = {"t": torch.arange(3, dtype=torch.float64), "a": np.arange(3.0)}
    target = np.zeros(3)
    restored = await _round_trip(
        tmp_path, saved, into={"t": target, "a": torch.zeros(3, dtype=torch.float64)}
    )
    assert restored["t"] is target
    np.testing.assert_array_equal(target, [0.0, 1.0, 2.0])
    assert isinstance(restored["a"], torch.Tensor)


@pytest.mark.parametrize(
    ("live", "pattern"),
    [
        (lambda: torch.zeros(3, 4, dtype=torch.float64), r"at w is float32\[3, 4\].*float64"),
        (lambda: torch.zeros(4, 3), r"at w is float32\[3, 4\].*\[4, 3\]"),
        (lambda: 1.5, r"at w the checkpoint holds an array but into= holds float"),
    ],
    ids=["dtype", "shape", "not-an-array"],
)
async def test_restore_into_a_mismatching_tensor_names_the_path(
    tmp_path: Path, live: Any, pattern: str
) -> None:
    path = await _save(tmp_path, {"w": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=pattern) as info:
        await Saver().restore(path, into={"w": live()})
    assert not isinstance(info.value, CheckpointError)


@pytest.mark.parametrize(
    ("tensor", "pattern"),
    [
        (lambda: torch.zeros(2, device="meta"), r"meta tensor at m/w.*\.cpu\(\)"),
        (lambda: torch.zeros(2, 2).to_sparse(), r"sparse_coo tensor at m/w.*to_dense"),
        (lambda: torch.zeros(2, dtype=torch.float4_e2m1fn_x2), r"float4_e2m1fn_x2 tensor at m/w"),
    ],
    ids=["device", "sparse", "no-numpy-dtype"],
)
def test_tensors_a_checkpoint_cannot_hold_are_refused_by_path(tensor: Any, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        SnapshotPool().take({"m": {"w": tensor()}})


async def test_without_torch_tensors_come_back_as_numpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await _save(tmp_path, {"t": torch.arange(4, dtype=torch.int16)})
    monkeypatch.setitem(sys.modules, "torch", None)
    restored = await Saver().restore(path)
    assert type(restored["t"]) is np.ndarray
    np.testing.assert_array_equal(restored["t"], np.arange(4, dtype=np.int16))


async def test_raw_dtypes_gives_bfloat16_tensors_as_uint16(tmp_path: Path) -> None:
    tensor = torch.randn(5).to(torch.bfloat16)
    restored = await _round_trip(tmp_path, {"t": tensor}, raw=True)
    assert restored["t"].dtype == torch.uint16
    assert _tensor_bits(restored["t"]) == _tensor_bits(tensor)


# -- objects with state_dict(): modules, optimizers, schedulers ------------------------------


def _mlp() -> Any:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train_step(model: Any, opt: Any, x: Any, y: Any) -> Any:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.slow
async def test_an_mlp_and_adamw_resume_bit_for_bit_from_a_fresh_pair(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        _train_step(model, opt, x, y)
        schedule.step()
    path = await _save(tmp_path, {"model": model, "opt": opt, "schedule": schedule})

    fresh_model = _mlp()  # other initial weights
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)  # its state is empty
    fresh_schedule = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    assert fresh_opt.state_dict()["state"] == {}
    weight = fresh_model[0].weight
    into = {"model": fresh_model, "opt": fresh_opt, "schedule": fresh_schedule}
    restored = await Saver().restore(path, into=into)
    assert restored["model"] is fresh_model
    assert fresh_model[0].weight is weight  # the live parameters were filled in place
    assert fresh_schedule.get_last_lr() == schedule.get_last_lr()

    expected = _train_step(model, opt, x, y)
    got = _train_step(fresh_model, fresh_opt, x, y)
    assert _tensor_bits(got) == _tensor_bits(expected)
    for original, resumed in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert _tensor_bits(resumed) == _tensor_bits(original)
    for key, state in opt.state_dict()["state"].items():
        resumed_state = fresh_opt.state_dict()["state"][key]
        for name, value in state.items():
            assert _tensor_bits(resumed_state[name]) == _tensor_bits(value)


async def test_without_into_objects_come_back_as_their_state_dicts(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    _train_step(model, opt, torch.ones(2, 4), torch.ones(2, 1))
    restored = await _round_trip(tmp_path, {"model": model, "opt": opt})
    assert list(restored["model"]) == list(model.state_dict())
    assert torch.equal(restored["model"]["0.weight"], model[0].weight.detach())
    assert sorted(restored["opt"]["state"]) == [0, 1, 2, 3]
    assert restored["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    fresh = _mlp()
    fresh.load_state_dict(restored["model"])
    assert torch.equal(fresh[2].bias, model[2].bias)


async def test_an_object_of_another_structure_gets_the_checkpoint_s_state(
    tmp_path: Path,
) -> None:
    # Inside an object's state into= only lends what fits: the object judges the rest.
    path = await _save(tmp_path, {"m": torch.nn.Linear(3, 2)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        await Saver().restore(path, into={"m": torch.nn.Linear(4, 2)})


# -- random generators -----------------------------------------------------------------------


async def test_numpy_generators_round_trip(tmp_path: Path) -> None:
    generator = np.random.default_rng(42)
    legacy = np.random.RandomState(7)
    bits = np.random.MT19937(3)
    generator.random(5)
    legacy.random_sample(5)
    bits.random_raw(5)
    saved = {"g": generator, "legacy": legacy, "bits": bits}
    path = await _save(tmp_path, saved)
    into: dict[str, Any] = {
        "g": np.random.default_rng(0),
        "legacy": np.random.RandomState(0),
        "bits": np.random.MT19937(0),
    }
    restored = await Saver().restore(path, into=into)
    assert restored["g"] is into["g"]
    np.testing.assert_array_equal(into["g"].random(4), generator.random(4))
    np.testing.assert_array_equal(into["legacy"].random_sample(4), legacy.random_sample(4))
    np.testing.assert_array_equal(into["bits"].random_raw(4), bits.random_raw(4))
    plain = await Saver().restore(path)
    assert plain["g"]["bit_generator"] == "PCG64"  # the state, never a constructed object


async def test_torch_and_python_generators_round_trip(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)
    python = random.Random(9)
    python.random()
    path = await _save(tmp_path, {"torch": generator, "python": python})
    into = {"torch": torch.Generator(), "python": random.Random()}
    await Saver().restore(path, into=into)
    assert torch.equal(torch.rand(4, generator=into["torch"]), torch.rand(4, generator=generator))
    assert into["python"].random() == python.random()
    plain = await Saver().restore(path)
    assert plain["torch"].dtype == torch.uint8
    assert isinstance(plain["python"], tuple)


# -- jax arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize(
    "dtype", ["float32", "bfloat16", "int8", "uint32", "bool", "float8_e4m3fn", "int4"]
)
async def test_jax_arrays_come_back_as_jax_arrays(
    tmp_path: Path, dtype: str, use_mmap: bool
) -> None:
    array = jnp.arange(12).reshape(3, 4).astype(dtype)
    restored = await _round_trip(tmp_path, {"j": array}, use_mmap=use_mmap)
    assert isinstance(restored["j"], jax.Array)
    assert restored["j"].dtype == array.dtype
    assert np.asarray(restored["j"]).tobytes() == np.asarray(array).tobytes()


def test_a_snapshot_copies_jax_arrays_so_donation_still_works() -> None:
    # A view kept by the snapshot would make jax skip donating the buffer (silently).
    array = jnp.arange(1000.0)
    snapshot = SnapshotPool().take({"j": array})
    (leaf,) = snapshot.leaves
    assert not np.shares_memory(leaf.array, np.asarray(array))
    doubled = jax.jit(lambda a: a * 2, donate_argnums=0)(array)
    assert array.is_deleted()
    np.testing.assert_array_equal(leaf.array, np.arange(1000.0))
    assert float(doubled[1]) == 2.0


async def test_restore_into_jax_arrays_replaces_them_on_their_devices(tmp_path: Path) -> None:
    saved = {"w": jnp.ones((2, 3)), "n": np.arange(3, dtype=np.int32)}
    live = {"w": jnp.zeros((2, 3)), "n": jnp.zeros(3, jnp.int32)}
    restored = await _round_trip(tmp_path, saved, into=live)
    assert isinstance(restored["w"], jax.Array)
    assert restored["w"].sharding == live["w"].sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones((2, 3)))
    assert isinstance(restored["n"], jax.Array)  # into= decides the kind
    with pytest.raises(ValueError, match=r"at w is float32\[2, 3\].*int32"):
        await _round_trip(tmp_path, saved, into={"w": jnp.zeros((2, 3), jnp.int32), "n": live["n"]})


async def test_float64_jax_leaves_are_never_narrowed(tmp_path: Path) -> None:
    with jax.enable_x64(True):
        array = jnp.arange(3, dtype=jnp.float64) / 3
        path = await _save(tmp_path, {"j": array})
        wide = await Saver().restore(path)
        assert wide["j"].dtype == jnp.float64
    restored = await Saver().restore(path)  # x64 off: jax would make it float32
    assert type(restored["j"]) is np.ndarray
    assert restored["j"].dtype == np.float64


async def test_without_jax_jax_arrays_come_back_as_numpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await _save(tmp_path, {"j": jnp.arange(3.0)})
    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.setitem(sys.modules, "jax.numpy", None)
    restored = await Saver().restore(path)
    assert type(restored["j"]) is np.ndarray


# -- container types come from into=, never from the file ------------------------------------


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass
class Config:
    weights: Any
    name: str = "c"
    derived: int = dataclasses.field(default=0, init=False)


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: Any
    b: Any


class FrozenDict(Mapping[str, Any]):
    """An immutable Mapping built from a dict, as flax's FrozenDict."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class Opaque(FrozenDict):
    """A Mapping whose constructor does not take its items."""

    def __init__(self) -> None:
        super().__init__({"k": np.zeros(2)})


class ArrayLike:
    def __init__(self, data: list[float]) -> None:
        self.data = data

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        return np.array(self.data, dtype=dtype)


def _containers(fill: float) -> dict[str, Any]:
    return {
        "point": Point(np.full(2, fill), fill),
        "ordered": collections.OrderedDict([("b", np.full(1, fill)), ("a", fill)]),
        "frozen_dict": FrozenDict({"k": np.full(3, fill)}),
        "proxy": types.MappingProxyType({"p": fill}),
        "config": Config(np.full(2, fill), name=str(fill)),
        "frozen": Frozen(np.full(1, fill), (fill, [fill])),
        "opaque": Opaque(),
        "array_like": ArrayLike([fill, fill]),
    }


async def test_without_into_containers_come_back_as_dicts_and_tuples(tmp_path: Path) -> None:
    restored = await _round_trip(tmp_path, _containers(1.0))
    assert type(restored["point"]) is tuple
    assert type(restored["ordered"]) is dict
    assert list(restored["ordered"]) == ["b", "a"]
    assert type(restored["frozen_dict"]) is dict
    assert restored["config"].keys() == {"weights", "name", "derived"}
    assert type(restored["frozen"]["b"]) is tuple
    assert type(restored["array_like"]) is np.ndarray
    np.testing.assert_array_equal(restored["array_like"], [1.0, 1.0])


async def test_restore_into_keeps_into_s_container_types(tmp_path: Path) -> None:
    into = _containers(0.0)
    point_x, ordered, config_weights = into["point"].x, into["ordered"], into["config"].weights
    restored = await _round_trip(tmp_path, _containers(2.0), into=into)
    assert type(restored["point"]) is Point
    assert restored["point"].x is point_x  # its arrays still filled in place
    np.testing.assert_array_equal(point_x, [2.0, 2.0])
    assert restored["point"].y == 2.0
    assert restored["ordered"] is ordered
    assert type(restored["frozen_dict"]) is FrozenDict
    np.testing.assert_array_equal(restored["frozen_dict"]["k"], np.full(3, 2.0))
    assert type(restored["proxy"]) is types.MappingProxyType
    assert restored["proxy"]["p"] == 2.0
    assert type(restored["config"]) is Config
    assert restored["config"].weights is config_weights
    assert restored["config"].name == "2.0"
    assert type(restored["frozen"]) is Frozen
    assert restored["frozen"].b == (2.0, [2.0])
    assert type(restored["opaque"]) is dict  # its type cannot be built from its items
    assert type(restored["array_like"]) is np.ndarray


class Registry(MutableMapping[str, Any]):
    """A MutableMapping that is no dict."""

    def __init__(self, **items: Any) -> None:
        self.items_ = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self.items_[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.items_[key] = value

    def __delitem__(self, key: str) -> None:
        del self.items_[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.items_)

    def __len__(self) -> int:
        return len(self.items_)


async def test_mutable_mappings_lists_and_tuples_take_into_s_kind(tmp_path: Path) -> None:
    saved = {"r": Registry(w=np.ones(2), n=3), "was_tuple": (1, 2), "was_list": [3, 4]}
    registry, as_list = Registry(w=np.zeros(2), n=0), [0, 0]
    into = {"r": registry, "was_tuple": as_list, "was_list": (0, 0)}
    restored = await _round_trip(tmp_path, saved, into=into)
    assert restored["r"] is registry
    assert registry["n"] == 3
    np.testing.assert_array_equal(registry["w"], [1.0, 1.0])
    assert restored["was_tuple"] is as_list
    assert as_list == [1, 2]
    assert restored["was_list"] == (3, 4)


async def test_restore_into_a_dataclass_of_other_fields_names_them(tmp_path: Path) -> None:
    path = await _save(tmp_path, {"c": Frozen(1, 2)})
    with pytest.raises(ValueError, match=r"at c keys differ.*\['a', 'b'\].*\['weights', 'name'"):
        await Saver().restore(path, into={"c": Config(np.zeros(2))})


def test_masked_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="masked array at m: its mask would be lost"):
        SnapshotPool().take({"m": np.ma.masked_array([1, 2], mask=[False, True])})


def test_a_read_only_view_of_a_writable_array_is_copied() -> None:
    live = np.arange(10.0)
    view = live[:]
    view.flags.writeable = False
    snapshot = SnapshotPool().take({"v": view})
    live[:] = -1
    np.testing.assert_array_equal(snapshot.leaves[0].array, np.arange(10.0))


# -- nothing is imported for a numpy-only user ------------------------------------------------


@pytest.mark.slow
def test_a_numpy_only_program_never_imports_torch_jax_or_ml_dtypes(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, anyio, numpy as np
        from asyncckpt import Saver

        async def main():
            saver = Saver()
            tree = {{"w": np.ones(3), "n": [1, (2, "x")], "rng": np.random.default_rng(1)}}
            path = await saver.save(tree, {str(tmp_path / "m")!r}, global_step=1)
            await saver.restore(path, into=tree)
            await saver.restore(path)

        anyio.run(main)
        print(sorted({{"torch", "jax", "ml_dtypes"}} & set(sys.modules)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


async def test_a_typed_prng_key_is_refused_with_its_path_and_what_to_save(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    with pytest.raises(TypeError, match=r"typed PRNG key at rng/key: save jax\.random\.key_data"):
        await Saver().save({"rng": {"key": jax.random.key(0)}}, str(tmp_path / "model.ckpt"), 1)
