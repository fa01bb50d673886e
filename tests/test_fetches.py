"""Fetches and feeds: resolving names against a step's outputs, merging hooks' feeds with the
caller's, and the same rules as users meet them through ``MonitoredSession.run``
(TF_SEMANTICS 12-16)."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pytest

from asyncckpt import (
    ChiefSessionCreator,
    MonitoredSession,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from asyncckpt._session._fetches import merge_feeds, resolve_fetches
from asyncckpt.testing import RecordingHook

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from asyncckpt._core._types import MaybeAwaitable

pytestmark = pytest.mark.anyio

OUTPUTS: dict[str, Any] = {"loss": 0.5, "acc": 0.9, "logits": np.arange(3)}


class Pair(NamedTuple):
    first: Any
    second: Any


# -- resolve_fetches ------------------------------------------------------------------------------


def test_a_name_resolves_to_that_output() -> None:
    assert resolve_fetches("loss", OUTPUTS, 7) == 0.5
    assert resolve_fetches("logits", OUTPUTS, 7) is OUTPUTS["logits"]


def test_global_step_is_always_available() -> None:
    assert resolve_fetches("global_step", OUTPUTS, 7) == 7
    assert resolve_fetches("global_step", {}, 0) == 0


def test_nested_lists_tuples_and_dicts_keep_their_structure_and_types() -> None:
    fetches = {"a": ["loss", ("acc", "global_step")], "b": {"c": "loss"}, 3: ()}
    result = resolve_fetches(fetches, OUTPUTS, 7)
    assert result == {"a": [0.5, (0.9, 7)], "b": {"c": 0.5}, 3: ()}
    assert type(result["a"]) is list
    assert type(result["a"][1]) is tuple
    assert type(result["b"]) is dict
    assert type(result[3]) is tuple
    assert list(result) == ["a", "b", 3]  # key order kept; keys are not resolved


def test_empty_structures_stay_empty_of_the_same_type() -> None:
    assert resolve_fetches([], OUTPUTS, 1) == []
    assert resolve_fetches((), OUTPUTS, 1) == ()
    assert resolve_fetches({}, OUTPUTS, 1) == {}


def test_a_namedtuple_keeps_its_type_and_fields() -> None:
    result = resolve_fetches(Pair("loss", ["acc", "global_step"]), OUTPUTS, 7)
    assert result == Pair(0.5, [0.9, 7])
    assert type(result) is Pair


def test_dict_subclasses_keep_their_type() -> None:
    ordered = resolve_fetches(OrderedDict([("z", "loss"), ("a", "acc")]), OUTPUTS, 1)
    assert type(ordered) is OrderedDict
    assert list(ordered.items()) == [("z", 0.5), ("a", 0.9)]
    factory: defaultdict[str, Any] = defaultdict(list, {"l": "loss"})
    counted = resolve_fetches(factory, OUTPUTS, 1)
    assert type(counted) is defaultdict
    assert counted.default_factory is list
    assert counted == {"l": 0.5}


def test_a_mapping_that_is_not_a_dict_comes_back_as_a_dict() -> None:
    result = resolve_fetches(MappingProxyType({"l": "loss"}), OUTPUTS, 1)
    assert result == {"l": 0.5}
    assert type(result) is dict


def test_none_is_none_for_a_hook_and_every_output_for_the_caller() -> None:
    assert resolve_fetches(None, OUTPUTS, 1) is None
    everything = resolve_fetches(None, OUTPUTS, 1, all_if_none=True)
    assert everything == OUTPUTS
    everything["extra"] = 1  # a copy: the step's outputs are not changed
    assert "extra" not in OUTPUTS


@pytest.mark.parametrize("fetches", ["nope", ["loss", ("acc", "nope")], {"k": {"j": "nope"}}])
def test_an_unknown_name_raises_key_error_listing_what_exists(fetches: Any) -> None:
    with pytest.raises(KeyError, match="nope") as excinfo:
        resolve_fetches(fetches, OUTPUTS, 1)
    message = str(excinfo.value)
    assert "['acc', 'logits', 'loss']" in message
    assert "global_step" in message


@pytest.mark.parametrize(
    ("fetches", "type_name"),
    [(3, "int"), (b"loss", "bytes"), ({"loss"}, "set"), (["loss", 1.5], "float")],
)
def test_a_fetch_that_is_not_a_name_or_structure_raises_type_error(
    fetches: Any, type_name: str
) -> None:
    with pytest.raises(TypeError, match=rf"output names \(str\).*not {type_name}$"):
        resolve_fetches(fetches, OUTPUTS, 1)


# -- merge_feeds -----------------------------------------------------------------------------------


def test_user_feeds_pass_through_unchanged_when_no_hook_feeds() -> None:
    user = {"x": 1, "lr": 0.1}
    assert merge_feeds(user, []) == {"x": 1, "lr": 0.1}
    assert user == {"x": 1, "lr": 0.1}
    assert merge_feeds(None, []) == {}


def test_feeds_of_hooks_and_user_are_merged() -> None:
    assert merge_feeds({"x": 1}, [{"a": 2}, {"b": 3}]) == {"a": 2, "b": 3, "x": 1}
    assert merge_feeds(None, [{"a": 2}]) == {"a": 2}


def test_two_hooks_feeding_the_same_input_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"^Same tensor is fed by two hooks.*\['a'\]"):
        merge_feeds(None, [{"a": 1, "b": 1}, {"c": 2}, {"a": 3}])


def test_a_hook_and_the_user_feeding_the_same_input_is_an_error() -> None:
    with pytest.raises(
        RuntimeError, match=r"^Same tensor is fed by a SessionRunHook and user.*\['b', 'x'\]"
    ):
        merge_feeds({"x": 1, "b": 2, "y": 3}, [{"x": 0}, {"b": 0}])


# -- through MonitoredSession.run ------------------------------------------------------------------


def step_fn(state: dict[str, Any], **feeds: Any) -> dict[str, Any]:
    """Record the feeds; the outputs depend on the step about to complete."""
    state["feeds"].append(feeds)
    step = len(state["feeds"])
    return {"loss": 1.0 / step, "acc": step * 10, "batch": feeds.get("batch")}


def new_state() -> dict[str, Any]:
    return {"feeds": []}


class FetchHook(SessionRunHook):
    """Fetch ``fetches`` (feed ``feed_dict``) every step; keep every ``results``."""

    def __init__(self, fetches: Any, feed_dict: Mapping[str, Any] | None = None) -> None:
        self.args = SessionRunArgs(fetches, feed_dict)
        self.results: list[Any] = []

    def before_run(self, run_context: SessionRunContext) -> MaybeAwaitable[SessionRunArgs]:
        return self.args

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.results.append(run_values.results)


class AsyncFetchHook(FetchHook):
    async def before_run(self, run_context: SessionRunContext) -> SessionRunArgs:
        return self.args


async def run_steps(hooks: Sequence[SessionRunHook], steps: int, state: Any) -> list[Any]:
    """Run ``steps`` steps and return what ``run("loss")`` returned for each."""
    returned: list[Any] = []
    async with MonitoredSession(ChiefSessionCreator(state, step_fn), hooks=hooks) as sess:
        returned = [await sess.run("loss") for _ in range(steps)]
    return returned


async def test_each_hook_gets_the_results_of_its_own_fetches_in_its_own_structure() -> None:
    by_name = FetchHook("acc")
    by_list = AsyncFetchHook(["loss", "global_step"])
    by_dict = FetchHook({"l": "loss", "g": ("global_step",), "n": Pair("acc", "loss")})
    returned = await run_steps([by_name, by_list, by_dict], 2, new_state())
    assert returned == [1.0, 0.5]
    assert by_name.results == [10, 20]
    assert by_list.results == [[1.0, 1], [0.5, 2]]
    assert by_dict.results == [
        {"l": 1.0, "g": (1,), "n": Pair(10, 1.0)},
        {"l": 0.5, "g": (2,), "n": Pair(20, 0.5)},
    ]


async def test_a_hook_without_fetches_gets_results_none() -> None:
    returns_none = RecordingHook()  # before_run returns None
    feeds_only = FetchHook(None, {"batch": 3})  # SessionRunArgs(fetches=None)
    await run_steps([returns_none, feeds_only], 2, new_state())
    assert returns_none.results == [None, None]
    assert feeds_only.results == [None, None]


async def test_the_caller_gets_every_output_for_fetches_none() -> None:
    async with MonitoredSession(ChiefSessionCreator(new_state(), step_fn)) as sess:
        assert await sess.run() == {"loss": 1.0, "acc": 10, "batch": None}
        assert await sess.run(["global_step", {"a": "acc"}]) == [2, {"a": 20}]


async def test_a_step_returning_none_has_no_outputs_but_global_step() -> None:
    hook = FetchHook("global_step")
    async with MonitoredSession(ChiefSessionCreator({}, lambda state: None), hooks=[hook]) as sess:
        assert await sess.run() == {}
        assert await sess.run("global_step") == 2
    assert hook.results == [1, 2]


async def test_hook_and_caller_feeds_arrive_as_step_fn_keyword_arguments() -> None:
    state = new_state()
    hooks = [FetchHook(None, {"lr": 0.1}), AsyncFetchHook("batch", {"dropout": 0.5})]
    async with MonitoredSession(ChiefSessionCreator(state, step_fn), hooks=hooks) as sess:
        await sess.run(feed_dict={"batch": 32})
        await sess.run()
    assert state["feeds"] == [
        {"lr": 0.1, "dropout": 0.5, "batch": 32},
        {"lr": 0.1, "dropout": 0.5},
    ]
    assert hooks[1].results == [32, None]


async def test_caller_feeds_pass_through_unchanged_without_feeding_hooks() -> None:
    state = new_state()
    feed = {"batch": np.ones(2)}
    async with MonitoredSession(
        ChiefSessionCreator(state, step_fn), hooks=[RecordingHook(), FetchHook("acc")]
    ) as sess:
        await sess.run(feed_dict=feed)
    assert state["feeds"] == [feed]
    assert state["feeds"][0]["batch"] is feed["batch"]


async def test_an_empty_feed_dict_from_a_hook_contributes_nothing() -> None:
    state = new_state()
    hooks = [FetchHook("acc", {}), FetchHook("acc", {})]
    async with MonitoredSession(ChiefSessionCreator(state, step_fn), hooks=hooks) as sess:
        await sess.run(feed_dict={"batch": 1})
    assert state["feeds"] == [{"batch": 1}]


@pytest.mark.parametrize(
    ("hook_feeds", "user_feeds", "message"),
    [
        ([{"lr": 1}, {"lr": 2}], None, "Same tensor is fed by two hooks"),
        ([{"lr": 1}], {"lr": 2}, "Same tensor is fed by a SessionRunHook and user"),
    ],
)
async def test_conflicting_feeds_raise_before_the_step_runs(
    hook_feeds: list[dict[str, Any]], user_feeds: dict[str, Any] | None, message: str
) -> None:
    state = new_state()
    recorder = RecordingHook()
    hooks: list[SessionRunHook] = [FetchHook(None, feeds) for feeds in hook_feeds]
    sess = MonitoredSession(ChiefSessionCreator(state, step_fn), hooks=[*hooks, recorder])
    with pytest.raises(RuntimeError, match=message):
        async with sess:
            await sess.run(feed_dict=user_feeds)
    assert state["feeds"] == []  # the step never ran
    assert sess.global_step == 0
    assert recorder.calls == [("begin", None), ("after_create_session", 0), ("before_run", 0)]


async def test_an_unknown_fetch_from_the_caller_raises_key_error() -> None:
    recorder = RecordingHook()
    with pytest.raises(KeyError, match=r"'nope'.*\['acc', 'batch', 'loss'\]"):
        async with MonitoredSession(
            ChiefSessionCreator(new_state(), step_fn), hooks=[recorder]
        ) as sess:
            await sess.run(["loss", "nope"])
    # The step completed, so the hooks saw it; the error is not the end of the input: no end().
    assert [method for method, _ in recorder.calls] == [
        "begin",
        "after_create_session",
        "before_run",
        "after_run",
    ]


async def test_an_unknown_fetch_from_a_hook_raises_key_error() -> None:
    with pytest.raises(KeyError, match="'nope'"):
        async with MonitoredSession(
            ChiefSessionCreator(new_state(), step_fn), hooks=[FetchHook({"x": "nope"})]
        ) as sess:
            await sess.run()


async def test_a_bad_fetch_type_from_the_caller_raises_type_error() -> None:
    with pytest.raises(TypeError, match="not int"):
        async with MonitoredSession(ChiefSessionCreator(new_state(), step_fn)) as sess:
            await sess.run(3)


async def test_a_caller_fetch_typo_does_not_hide_the_step_from_hooks() -> None:
    from asyncckpt import ChiefSessionCreator, MonitoredSession, StopAtStepHook
    from asyncckpt.testing import RecordingHook

    def step(state: dict[str, int]) -> dict[str, int]:
        state["n"] += 1
        return {"loss": state["n"]}

    hook = RecordingHook()
    creator = ChiefSessionCreator({"n": 0}, step)
    async with MonitoredSession(creator, hooks=[hook, StopAtStepHook(last_step=1)]) as sess:
        with pytest.raises(KeyError, match="lose"):
            await sess.run("lose")
        assert sess.should_stop()  # StopAtStepHook saw step 1
    assert hook.calls == [
        ("begin", None),
        ("after_create_session", 0),
        ("before_run", 0),
        ("after_run", 1),
        ("end", 1),
    ]
