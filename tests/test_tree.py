"""State trees: what a checkpoint can hold, how it comes back, and how snapshots reuse memory.

Round trips go through the public ``Saver.save`` / ``Saver.restore`` into ``tmp_path``, on
both read paths (buffered reads and ``mmap=True``); ``SnapshotPool`` is tested directly,
since it is what makes a repeated save allocate nothing.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import TYPE_CHECKING, Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.extra import numpy as hnp

from asyncckpt import CheckpointError, Saver
from asyncckpt._checkpoint import _snapshot
from asyncckpt._checkpoint._snapshot import SnapshotPool
from asyncckpt._tree import MAX_DEPTH

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.anyio

CLOCK = 1_700_000_000.0


# -- helpers ---------------------------------------------------------------------------------


def _float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def assert_same(actual: Any, expected: Any, path: str = "<root>") -> None:
    """Assert two trees are identical: types, dict order, dtypes, shapes and bytes (nan-aware)."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: {type(actual).__name__} is no array"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: array bytes differ"
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: scalar bytes differ"
    elif isinstance(expected, float):
        assert _float_bits(actual) == _float_bits(expected), f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, complex):
        got = (_float_bits(actual.real), _float_bits(actual.imag))
        assert got == (_float_bits(expected.real), _float_bits(expected.imag)), path
    elif isinstance(expected, dict):
        assert [(type(k), k) for k in actual] == [(type(k), k) for k in expected], (
            f"{path}: keys {list(actual)} != {list(expected)}"
        )
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}/{i}")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


async def round_trip(tmp_path: Path, tree: Any, *, use_mmap: bool = False) -> Any:
    saver = Saver(max_to_keep=1, clock=lambda: CLOCK)
    path = await saver.save(tree, tmp_path / "model.ckpt", global_step=1)
    return await saver.restore(path, mmap=use_mmap)


class Counter:
    """A stateful object saved through state_dict(), like a PyTorch module or an iterator."""

    def __init__(self, n: int = 0, weights: np.ndarray[Any, Any] | None = None) -> None:
        self.n = n
        self.weights = np.zeros(3) if weights is None else weights
        self.loaded: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(state)
        self.n = state["n"]
        self.weights = state["weights"]


# -- round trips of every leaf type ----------------------------------------------------------

ARRAYS: dict[str, np.ndarray[Any, Any]] = {
    "bool": np.array([True, False, True]),
    "int8": np.array([-128, 0, 127], np.int8),
    "int16": np.array([-(2**15), 2**15 - 1], np.int16),
    "int32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
    "int64": np.array([-(2**63), 2**63 - 1], np.int64),
    "uint8": np.arange(256, dtype=np.uint8),
    "uint16": np.array([0, 2**16 - 1], np.uint16),
    "uint32": np.array([0, 2**32 - 1], np.uint32),
    "uint64": np.array([0, 2**64 - 1], np.uint64),
    "float16": np.array([1.5, -0.0, np.inf, np.nan], np.float16),
    "float32": np.array([[1.25, np.nan], [-np.inf, 3e38]], np.float32),
    "float64": np.array([np.nan, -0.0, 5e-324, 1.7976931348623157e308]),
    "complex64": np.array([1 + 2j, complex(np.nan, -0.0)], np.complex64),
    "complex128": np.array([complex(np.inf, -1), 3j]),
    "datetime64": np.array(["2024-02-29T12:34:56.789", "NaT"], "datetime64[ms]"),
    "datetime64_generic": np.array(["2001-01-01"], "datetime64[D]"),
    "timedelta64": np.array([1, -2, "NaT"], "timedelta64[ns]"),
    "bytes_S": np.array([b"ab", b"", b"\x00\xffz"], "S3"),
    "unicode_U": np.array(["héllo", "✓", "𝄞x"], "U5"),
    "structured": np.array(
        [(1, 2.5, b"x"), (-1, np.nan, b"yz")], [("i", "<i4"), ("f", ">f8"), ("s", "S2")]
    ),
    "structured_aligned": np.zeros(2, np.dtype([("a", "u1"), ("b", "<f8")], align=True)),
    "structured_nested": np.ones(3, [("inner", [("x", "<f4"), ("y", "u1", (2,))]), ("k", "<i2")]),
    "structured_offsets": np.zeros(
        2, np.dtype({"names": ["a", "b"], "formats": ["u1", "<f8"], "offsets": [0, 16]})
    ),
    "big_endian": np.array([1.5, -2.25, np.nan], ">f8"),
    "big_endian_int": np.array([[1, 256], [-1, 2**30]], ">i4"),
    "zero_d": np.array(3.5),
    "zero_d_int": np.array(-7, np.int64),
    "empty": np.array([], np.float32),
    "empty_0x3": np.zeros((0, 3), np.int16),
    "empty_3x0x2": np.zeros((3, 0, 2)),
    "high_dim": np.arange(2**6, dtype=np.uint8).reshape((2,) * 6),
    "void": np.array([b"\x01\x02\x03\x04"], "V4"),
}


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("name", list(ARRAYS))
async def test_array_round_trip(tmp_path: Path, name: str, use_mmap: bool) -> None:
    array = ARRAYS[name]
    restored = await round_trip(tmp_path, {"x": array}, use_mmap=use_mmap)
    assert_same(restored, {"x": array})


async def test_all_arrays_in_one_checkpoint(tmp_path: Path) -> None:
    for use_mmap in (False, True):
        assert_same(await round_trip(tmp_path, ARRAYS, use_mmap=use_mmap), ARRAYS)


NON_CONTIGUOUS: dict[str, np.ndarray[Any, Any]] = {
    "slice": np.arange(20, dtype=np.float64)[::3],
    "transpose": np.arange(12, dtype=np.int32).reshape(3, 4).T,
    "column": np.arange(12.0).reshape(3, 4)[:, 1],
    "negative_stride": np.arange(5, dtype=np.uint16)[::-1],
    "fortran": np.asfortranarray(np.arange(6, dtype=np.complex64).reshape(2, 3)),
    "field_view": ARRAYS["structured"]["f"],
}


@pytest.mark.parametrize("name", list(NON_CONTIGUOUS))
async def test_non_contiguous_views_round_trip_as_c_arrays(tmp_path: Path, name: str) -> None:
    view = NON_CONTIGUOUS[name]
    expected = view.copy(order="C")
    for use_mmap in (False, True):
        restored = await round_trip(tmp_path, [view], use_mmap=use_mmap)
        assert_same(restored, [expected])
        assert restored[0].flags.c_contiguous


NUMPY_SCALARS: list[np.generic] = [
    np.bool_(True),
    np.int8(-5),
    np.uint64(2**64 - 1),
    np.int64(-(2**63)),
    np.float16(0.5),
    np.float32(1.5),
    np.float64(-0.0),
    np.float64("nan"),
    np.complex64(1 - 2j),
    np.complex128(complex(np.inf, np.nan)),
    np.datetime64("2020-01-01T00:00:00", "s"),
    np.timedelta64(-3, "us"),
    np.bytes_(b"abc"),
    np.str_("héllo"),
    np.array([(1, 2.0)], [("a", "<i2"), ("b", ">f4")])[0],
]


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_numpy_scalars_come_back_as_numpy_scalars(tmp_path: Path, use_mmap: bool) -> None:
    restored = await round_trip(tmp_path, NUMPY_SCALARS, use_mmap=use_mmap)
    assert_same(restored, NUMPY_SCALARS)
    for value, original in zip(restored, NUMPY_SCALARS, strict=True):
        assert isinstance(value, np.generic)
        assert type(value) is type(original)
        assert value.dtype == original.dtype


PYTHON_LEAVES: dict[str, Any] = {
    "true": True,
    "false": False,
    "zero": 0,
    "negative": -12345,
    "int64_min": -(2**63),
    "below_int64": -(2**63) - 1,
    "uint64_max": 2**64 - 1,
    "uint64_end": 2**64,
    "huge": 3**500,
    "huge_negative": -(7**300),
    "most_digits": -(10**4300 - 1),  # 4300 digits and a sign: the largest int saved
    "float": 0.1,
    "nan": math.nan,
    "inf": math.inf,
    "minus_inf": -math.inf,
    "minus_zero": -0.0,
    "subnormal": 5e-324,
    "complex": complex(1.5, -2.5),
    "complex_nan": complex(math.nan, -0.0),
    "str": "héllo wörld ✓ 𝄞",
    "empty_str": "",
    "bytes": b"\x00\x01\xffbinary",
    "empty_bytes": b"",
    "none": None,
}


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_python_leaves_round_trip(tmp_path: Path, use_mmap: bool) -> None:
    restored = await round_trip(tmp_path, PYTHON_LEAVES, use_mmap=use_mmap)
    assert_same(restored, PYTHON_LEAVES)


@pytest.mark.parametrize("leaf", [None, 7, 2**100, "x", b"raw", np.float32(2), np.arange(3)])
async def test_a_bare_leaf_is_a_tree(tmp_path: Path, leaf: Any) -> None:
    assert_same(await round_trip(tmp_path, leaf), leaf)


async def test_containers_keep_kind_order_and_key_types(tmp_path: Path) -> None:
    tree = {
        "z": 1,
        "a": 2,
        3: "int key",
        "3": "str key, distinct from 3",
        -1: [1, (2, 3), []],
        0: (),
        "nested": {"inner": {2: [{"deep": (np.arange(2), None)}]}},
        "empty": {},
        "tuple_of_tuples": ((1,), ((),)),
    }
    for use_mmap in (False, True):
        restored = await round_trip(tmp_path, tree, use_mmap=use_mmap)
        assert_same(restored, tree)
        assert list(restored) == ["z", "a", 3, "3", -1, 0, "nested", "empty", "tuple_of_tuples"]
        assert type(restored["tuple_of_tuples"][1][0]) is tuple


async def test_the_same_array_twice_is_saved_twice(tmp_path: Path) -> None:
    shared = np.arange(4)
    restored = await round_trip(tmp_path, {"a": shared, "b": [shared]})
    assert_same(restored, {"a": shared, "b": [shared]})
    assert not np.shares_memory(restored["a"], restored["b"][0])


async def test_objects_save_their_state_dict(tmp_path: Path) -> None:
    counter = Counter(5, np.array([1.0, 2.0, 3.0]))
    restored = await round_trip(tmp_path, {"model": counter, "step": 3})
    # Without into=, nothing is constructed: the saved state comes back as a plain tree.
    assert_same(restored, {"model": {"n": 5, "weights": np.array([1.0, 2.0, 3.0])}, "step": 3})


async def test_the_saved_tree_is_a_copy_taken_at_save_time(tmp_path: Path) -> None:
    live: dict[str, Any] = {"w": np.zeros(3), "items": [1, 2]}
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save(live, tmp_path / "model.ckpt", global_step=1)
    live["w"][:] = 9
    live["items"].append(3)
    assert_same(await saver.restore(path), {"w": np.zeros(3), "items": [1, 2]})


def _leaf_arrays() -> st.SearchStrategy[Any]:
    dtypes = st.one_of(
        hnp.scalar_dtypes(),
        hnp.byte_string_dtypes(max_len=4),
        hnp.unicode_string_dtypes(max_len=4),
        hnp.array_dtypes(
            subtype_strategy=st.one_of(hnp.scalar_dtypes(), hnp.array_dtypes(max_size=2)),
            max_size=3,
        ),
    )
    arrays = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    return st.one_of(
        arrays,
        arrays.map(lambda a: a.T),
        arrays.filter(lambda a: a.ndim > 0).map(lambda a: a[::2]),
        hnp.arrays(dtypes, ()).map(lambda a: a[()]),  # numpy scalars
    )


_LEAVES: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.complex_numbers(),
    st.text(max_size=8),
    st.binary(max_size=8),
    _leaf_arrays(),
)
_KEYS = st.one_of(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1))
TREES: st.SearchStrategy[Any] = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(_KEYS, children, max_size=4),
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def hypothesis_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for all examples (hypothesis refuses function-scoped fixtures)."""
    return tmp_path_factory.mktemp("tree-hypothesis")


@pytest.mark.slow
@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=TREES)
async def test_hypothesis_trees_round_trip(hypothesis_dir: Path, tree: Any) -> None:
    expected = _contiguous_copy(tree)
    saver = Saver(max_to_keep=1, clock=lambda: CLOCK)
    path = await saver.save(tree, hypothesis_dir / "model.ckpt", global_step=1)
    assert_same(await saver.restore(path), expected)
    assert_same(await saver.restore(path, mmap=True), expected)


def _contiguous_copy(tree: Any) -> Any:
    """What a restore returns: the same tree with C-contiguous arrays."""
    if isinstance(tree, np.ndarray):
        return tree.copy(order="C")  # ascontiguousarray() would make 0-d 1-d
    if isinstance(tree, dict):
        return {k: _contiguous_copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_contiguous_copy(v) for v in tree)
    return tree


# -- restore into an existing tree -----------------------------------------------------------


async def test_restore_into_fills_arrays_dicts_lists_and_objects_in_place(tmp_path: Path) -> None:
    saved_counter = Counter(7, np.array([1.0, 2.0, 3.0]))
    saved = {
        "w": np.arange(6.0).reshape(2, 3),
        "layers": [np.array([1, 2], np.int32), {"b": np.array([0.5])}],
        "model": saved_counter,
        "step": 42,
        "name": "saved",
        "pair": (np.array([9, 9]), "x"),
    }
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save(saved, tmp_path / "model.ckpt", global_step=1)

    w = np.zeros((2, 3))
    layer0 = np.zeros(2, np.int32)
    bias = np.zeros(1)
    inner = {"b": bias}
    layers: list[Any] = [layer0, inner]
    counter = Counter()
    counter_weights = counter.weights
    pair_array = np.zeros(2, np.int64)
    into = {
        "w": w,
        "layers": layers,
        "model": counter,
        "step": 0,
        "name": "live",
        "pair": (pair_array, "y"),
    }

    restored = await saver.restore(path, into=into)

    assert restored is into
    assert into["w"] is w
    np.testing.assert_array_equal(w, saved["w"])
    assert into["layers"] is layers
    assert layers[0] is layer0
    assert layers[1] is inner
    assert inner["b"] is bias
    np.testing.assert_array_equal(layer0, [1, 2])
    np.testing.assert_array_equal(bias, [0.5])
    assert into["model"] is counter
    assert len(counter.loaded) == 1
    assert counter.n == 7
    assert counter.weights is counter_weights  # filled in place, then handed to the object
    np.testing.assert_array_equal(counter_weights, [1.0, 2.0, 3.0])
    assert into["step"] == 42
    assert into["name"] == "saved"
    assert into["pair"][1] == "x"
    assert into["pair"][0] is pair_array
    np.testing.assert_array_equal(pair_array, [9, 9])


async def test_restore_into_a_non_contiguous_array_writes_through_the_view(
    tmp_path: Path,
) -> None:
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save({"w": np.arange(6.0).reshape(3, 2)}, tmp_path / "m", global_step=1)
    base = np.zeros((2, 3))
    view = base.T  # writable, not C-contiguous
    restored = await saver.restore(path, into={"w": view})
    assert restored["w"] is view
    np.testing.assert_array_equal(base, np.arange(6.0).reshape(3, 2).T)


async def test_restore_into_replaces_read_only_arrays(tmp_path: Path) -> None:
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save({"w": np.arange(3.0)}, tmp_path / "m", global_step=1)
    frozen = np.zeros(3)
    frozen.flags.writeable = False
    restored = await saver.restore(path, into={"w": frozen})
    assert restored["w"] is not frozen
    np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(frozen, [0.0, 0.0, 0.0])


SAVED_FOR_MISMATCH: dict[str, Any] = {
    "params": {"w": np.zeros((2, 3), np.float32), "layers": [np.zeros(2), np.zeros(2)]},
    "model": Counter(),
}


def _into(**changes: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "w": np.zeros((2, 3), np.float32),
        "layers": [np.zeros(2), np.zeros(2)],
    }
    tree: dict[str, Any] = {"params": params, "model": Counter()}
    for key, value in changes.items():
        if key in params:
            params[key] = value
        else:
            tree[key] = value
    return tree


MISMATCHES: dict[str, tuple[Callable[[], Any], str]] = {
    "missing_key": (lambda: {"params": _into()["params"]}, r"at <root> keys differ.*\['model'\]"),
    "extra_key": (lambda: {**_into(), "extra": 1}, r"at <root> keys differ.*\['extra'\]"),
    "list_length": (lambda: _into(layers=[np.zeros(2)]), r"at params/layers .*2 items.*1 items"),
    "dict_vs_list": (
        lambda: _into(layers={"0": np.zeros(2)}),
        r"at params/layers .*sequence.*dict",
    ),
    "list_vs_dict": (lambda: {"params": [1, 2], "model": Counter()}, r"at params .*dict.*list"),
    "array_vs_scalar": (lambda: _into(w=0.0), r"at params/w .*array.*float"),
    "shape": (
        lambda: _into(w=np.zeros((3, 2), np.float32)),
        r"params/w .*float32\[2, 3\].*\[3, 2\]",
    ),
    "dtype": (lambda: _into(w=np.zeros((2, 3), np.float64)), r"params/w .*float32.*float64"),
    "object_vs_dict": (
        lambda: _into(model={"n": 0, "weights": np.zeros(3)}),
        r"at model .*state_dict",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
async def test_restore_into_a_different_structure_names_the_path(tmp_path: Path, case: str) -> None:
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save(SAVED_FOR_MISMATCH, tmp_path / "model.ckpt", global_step=1)
    make_into, pattern = MISMATCHES[case]
    with pytest.raises(ValueError, match=pattern) as info:
        await saver.restore(path, into=make_into())
    assert not isinstance(info.value, CheckpointError)  # the file is fine; into= is not


@pytest.mark.parametrize("case", ["missing_key", "list_length", "shape", "dtype"])
async def test_restore_into_with_mmap_checks_the_structure_too(tmp_path: Path, case: str) -> None:
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save(SAVED_FOR_MISMATCH, tmp_path / "model.ckpt", global_step=1)
    make_into, pattern = MISMATCHES[case]
    into = make_into()
    if case == "shape":  # a shape numpy would broadcast into must still be refused
        into["params"]["w"] = np.zeros((4, 2, 3), np.float32)
        pattern = r"params/w"
    with pytest.raises(ValueError, match=pattern):
        await saver.restore(path, into=into, mmap=True)


# -- mmap ------------------------------------------------------------------------------------


def _mapping_of(array: np.ndarray[Any, Any]) -> object:
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


async def test_mmap_returns_read_only_views_of_the_file(tmp_path: Path) -> None:
    tree = {"a": np.arange(1000, dtype=np.float64), "b": [np.ones((3, 4), ">i2")], "s": 1}
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save(tree, tmp_path / "model.ckpt", global_step=1)
    restored = await saver.restore(path, mmap=True)
    assert_same(restored, tree)
    a, b = restored["a"], restored["b"][0]
    for array in (a, b):
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
    mapping = _mapping_of(a)
    assert isinstance(mapping, mmap.mmap)
    assert _mapping_of(b) is mapping  # one mapping, no copy per array
    whole = np.frombuffer(mapping, np.uint8)
    assert np.shares_memory(a, whole)
    assert np.shares_memory(b, whole)
    # The mapping outlives the file's name.
    os.remove(path)
    assert_same(restored, tree)


# -- tree errors -----------------------------------------------------------------------------


class Opaque:
    """Neither a container nor a state_dict() object."""


class SelfState:
    def state_dict(self) -> SelfState:
        return self

    def load_state_dict(self, state: Any) -> None:
        raise AssertionError("never restored")


def _deep(levels: int, leaf: Any = 1) -> Any:
    tree = leaf
    for _ in range(levels):
        tree = [tree]
    return tree


def _self_list() -> list[Any]:
    items: list[Any] = [1]
    items.append({"again": items})
    return items


BAD_TREES: dict[str, tuple[Any, str]] = {
    "set": ({"a": [1, {"s": {1, 2}}]}, r"cannot save set at a/1/s"),
    "object_array": ({"p": {"w": np.array([1, None], object)}}, r"object array at p/w"),
    "arbitrary_object": ({"x": [Opaque()]}, r"cannot save Opaque at x/0"),
    "float_key": ({"a": {1.5: 0}}, r"dict key 1\.5 \(float\) at a"),
    "bool_key": ({"a": {True: 0}}, r"dict key True \(bool\) at a"),
    "tuple_key": ({"a": {(1,): 0}}, r"dict key \(1,\) \(tuple\) at a"),
    "huge_int_key": ({"a": {2**64: 0}}, r"dict key 18446744073709551616 \(int\) at a"),
    "self_list": ({"loop": _self_list()}, r"contains itself, at loop/1/again"),
    "self_state_dict": ({"m": SelfState()}, r"contains itself, at m"),
    "surrogate_str": ({"name": "bad\udc80"}, r"string 'bad\\udc80' at name"),
    "surrogate_key": ({"bad\udc80": 1}, r"dict key 'bad\\udc80' at <root>"),
    "too_many_digits": ({"n": 10**4300}, r"more than 4300 digits at n"),
    "string_dtype": ({"s": np.array(["a"], np.dtypes.StringDType())}, r"object array at s"),
    "overlapping_fields": (
        {"r": np.zeros(1, {"names": ["a", "b"], "formats": ["<f8", "<f8"], "offsets": [8, 0]})},
        r"structured dtype at r",
    ),
    "too_deep": ({"d": _deep(MAX_DEPTH)}, rf"deeper than {MAX_DEPTH} levels at d/0/0"),
    "too_deep_list": (_deep(MAX_DEPTH + 1), rf"deeper than {MAX_DEPTH} levels at 0/0"),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_unsavable_trees_raise_type_error_naming_the_path(case: str) -> None:
    tree, pattern = BAD_TREES[case]
    with pytest.raises(TypeError, match=pattern):
        SnapshotPool().take(tree)


async def test_save_of_an_unsavable_tree_raises_before_writing(tmp_path: Path) -> None:
    saver = Saver(clock=lambda: CLOCK)
    with pytest.raises(TypeError, match=r"cannot save set at params/layers/1"):
        await saver.save({"params": {"layers": [1, {3}]}}, tmp_path / "model.ckpt", global_step=1)
    assert os.listdir(tmp_path) == []


async def test_nesting_up_to_max_depth_round_trips(tmp_path: Path) -> None:
    tree = _deep(MAX_DEPTH, np.arange(2))
    for use_mmap in (False, True):
        assert_same(await round_trip(tmp_path, tree, use_mmap=use_mmap), tree)
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save(tree, tmp_path / "deep", global_step=1)
    into = _deep(MAX_DEPTH, np.zeros(2, np.int64))
    await saver.restore(path, into=into)
    leaf = into
    for _ in range(MAX_DEPTH):
        leaf = leaf[0]
    np.testing.assert_array_equal(leaf, [0, 1])


def test_objects_count_towards_the_depth_limit() -> None:
    # Objects add no path key, so without counting them a chain of state_dict() objects
    # would nest without bound (and overflow Python's stack when rebuilt).
    tree: Any = 1
    for _ in range(MAX_DEPTH):
        tree = _Wrap(tree)
    SnapshotPool().take(tree)  # the leaf sits exactly at MAX_DEPTH
    with pytest.raises(TypeError, match=f"deeper than {MAX_DEPTH} levels at <root>"):
        SnapshotPool().take(_Wrap(tree))


class _Wrap:
    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


# -- the spec: the tags docs/FORMAT.md documents ---------------------------------------------


def test_spec_tags_are_the_documented_ones() -> None:
    tree = {
        "n": None,
        "b": True,
        "i": -3,
        "I": 2**64,
        "f": 0.5,
        "c": 1 - 2j,
        "s": "x",
        "a": np.zeros(2),
        "g": np.float32(1),
        "y": b"ab",
        5: [1, (2,)],
        "o": _Wrap({"k": 1}),
    }
    snapshot = SnapshotPool().take(tree)
    assert snapshot.spec == [
        "d",
        [
            ["n", ["n"]],
            ["b", ["b", True]],
            ["i", ["i", -3]],
            ["I", ["I", "18446744073709551616"]],
            ["f", ["f", 0.5]],
            ["c", ["c", 1.0, -2.0]],
            ["s", ["s", "x"]],
            ["a", ["a", 0]],
            ["g", ["g", 1]],
            ["y", ["y", 2]],
            [5, ["l", [["i", 1], ["t", [["i", 2]]]]]],
            ["o", ["o", ["d", [["k", ["i", 1]]]]]],
        ],
    ]
    assert [leaf.path for leaf in snapshot.leaves] == [("a",), ("g",), ("y",)]
    assert snapshot.nbytes == 16 + 4 + 2


@pytest.mark.parametrize(
    ("value", "tag"),
    [(-(2**63), "i"), (-(2**63) - 1, "I"), (2**64 - 1, "i"), (2**64, "I")],
)
def test_int_tag_boundaries(value: int, tag: str) -> None:
    assert SnapshotPool().take(value).spec[0] == tag


# -- snapshot pool ---------------------------------------------------------------------------


def _state() -> dict[str, Any]:
    return {"w": np.zeros((64, 64)), "layers": [np.ones(10, np.int32), {"b": np.zeros(3)}]}


def test_repeated_snapshots_reuse_their_buffers() -> None:
    pool = SnapshotPool()
    tree = _state()
    pool.take(tree).release()
    allocated, nbytes = pool.buffers_allocated, pool.bytes_allocated
    assert allocated == 3
    assert nbytes == 64 * 64 * 8 + 10 * 4 + 3 * 8
    for step in range(5):
        tree["w"][0, 0] = step
        snapshot = pool.take(tree)
        assert snapshot.leaves[0].array[0, 0] == step
        snapshot.release()
    assert (pool.buffers_allocated, pool.bytes_allocated) == (allocated, nbytes)


def test_snapshots_in_flight_never_share_buffers() -> None:
    pool = SnapshotPool()
    tree = _state()
    first = pool.take(tree)
    first.release()
    first.release()  # a second release must not hand the same buffers out twice
    second, third = pool.take(tree), pool.take(tree)
    for a, b in zip(second.leaves, third.leaves, strict=True):
        assert not np.shares_memory(a.array, b.array)
    assert pool.buffers_allocated == 6


def test_a_changed_shape_gets_a_new_buffer() -> None:
    pool = SnapshotPool()
    pool.take({"w": np.zeros(4)}).release()
    snapshot = pool.take({"w": np.zeros(5)})
    assert snapshot.leaves[0].array.shape == (5,)
    assert pool.buffers_allocated == 2


def test_a_failed_snapshot_gives_its_buffers_back() -> None:
    pool = SnapshotPool()
    with pytest.raises(TypeError, match="cannot save set at z"):
        pool.take({"w": np.zeros(8), "z": set()})
    pool.take({"w": np.zeros(8)}).release()
    assert pool.buffers_allocated == 1


def test_mutable_arrays_are_copied() -> None:
    live = np.arange(10.0)
    snapshot = SnapshotPool().take({"w": live})
    live[:] = -1
    frozen = snapshot.leaves[0].array
    np.testing.assert_array_equal(frozen, np.arange(10.0))
    assert not np.shares_memory(frozen, live)


def test_read_only_contiguous_arrays_and_bytes_are_referenced() -> None:
    pool = SnapshotPool()
    constant = np.arange(10.0)
    constant.flags.writeable = False
    blob = b"\x00" * 1000
    snapshot = pool.take({"c": constant, "b": blob})
    assert np.shares_memory(snapshot.leaves[0].array, constant)
    assert np.shares_memory(snapshot.leaves[1].array, np.frombuffer(blob, np.uint8))
    assert pool.buffers_allocated == 0


def test_non_contiguous_read_only_arrays_are_copied() -> None:
    pool = SnapshotPool()
    base = np.arange(20.0)
    base.flags.writeable = False
    view = base[::2]
    snapshot = pool.take([view, base.reshape(4, 5).T])
    for leaf, source in zip(snapshot.leaves, (view, base.reshape(4, 5).T), strict=True):
        assert leaf.array.flags.c_contiguous
        assert not np.shares_memory(leaf.array, base)
        np.testing.assert_array_equal(leaf.array, source)
    assert pool.buffers_allocated == 2


def test_numpy_scalars_are_snapshotted_as_0d_arrays() -> None:
    snapshot = SnapshotPool().take(np.int16(-3))
    (leaf,) = snapshot.leaves
    assert leaf.array.shape == ()
    assert leaf.array.dtype == np.int16
    assert leaf.array[()] == -3


@pytest.mark.parametrize("threshold", [0, 1 << 40], ids=["all-cores", "caller-only"])
def test_a_snapshot_copied_on_several_threads_equals_the_tree(
    monkeypatch: pytest.MonkeyPatch, threshold: int
) -> None:
    # Large states are cut into one share per core (arrays cut along their rows); with the
    # threshold lowered, small arrays of every layout take that path.
    monkeypatch.setattr(_snapshot, "_PARALLEL_COPY_BYTES", threshold)
    rng = np.random.default_rng(7)
    tree = {
        "big": rng.random(50_000),
        "strided": rng.random((300, 40))[:, ::3],
        "one_row": rng.random((1, 5_000)),
        "scalar": np.asarray(2.5),
        "empty": np.zeros((0, 4)),
        "records": np.zeros(100, dtype=[("a", "<i4"), ("b", "<f8")]),
        "tail": rng.integers(0, 9, 7),
    }
    snapshot = SnapshotPool().take(tree)
    for leaf in snapshot.leaves:
        np.testing.assert_array_equal(leaf.array, tree[str(leaf.path[0])])
        assert leaf.array.flags.c_contiguous
    snapshot.release()
