"""The Jepsen-style checker (tests/harness/jepsen.py) on made-up histories and logs: it must catch each
kind of violation the namespace runs look for, and not call a clean run or an unanswered write lost."""

from __future__ import annotations

import json
import threading
from typing import Any

from tests.harness.jepsen import History, Observation, Op, Outcome, Writer, check
from tests.harness.netns_cluster import NodeApiError


def event(index: int, log_term: int, kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "index": index,
        "term": log_term,
        "origin_node_id": "n0",
        "origin_sequence": index,
        "event": {"type": kind, **fields},
    }


LOG = [
    event(1, 1, "MasterElected", term=1, node_id="n0"),
    event(2, 1, "InstanceCreated", instance_id="i-1"),
    event(3, 1, "InstanceDeleted", instance_id="i-1"),
]


def history_of(*ops: tuple[str, str, Outcome]) -> History:
    history = History()
    for kind, instance_id, outcome in ops:
        history.record(Op("writer-n0", kind, instance_id, 0.0, 0.1, outcome))
    return history


def test_a_clean_run_has_no_problems() -> None:
    history = history_of(("place", "i-1", "ok"), ("delete", "i-1", "ok"))
    observations = [Observation("n0", leading={1: 0.5}, served=LOG[:2]), Observation("n1", served=LOG)]
    verdict = check(history, observations, {"n0": LOG, "n1": LOG})
    assert verdict.problems == []
    assert verdict.acknowledged == {"place": 1, "delete": 1}
    assert verdict.masters_by_term == {1: ["n0"]}


def test_an_acknowledged_write_missing_from_one_log_is_lost_there() -> None:
    history = history_of(("place", "i-1", "ok"), ("place", "i-2", "ok"))
    verdict = check(history, [], {"n0": LOG, "n1": LOG})
    assert verdict.lost == {"n0": ["place i-2"], "n1": ["place i-2"]}
    assert verdict.lost_writes() == {"place i-2"}
    assert "lost: 1 (missing from 2 node logs)" in verdict.summary()
    assert any("n0's log lacks 1 acknowledged writes: place i-2" in problem for problem in verdict.problems)


def test_refused_and_unanswered_writes_are_not_lost() -> None:
    history = history_of(("place", "i-9", "fail"), ("place", "i-8", "info"))
    assert check(history, [], {"n0": LOG}).problems == []


def test_two_masters_in_one_term_from_either_evidence() -> None:
    claimed = [Observation("n0", leading={2: 1.0}), Observation("n1", leading={2: 1.5})]
    verdict = check(history_of(), claimed, {"n0": LOG})
    assert verdict.masters_by_term[2] == ["n0", "n1"]
    assert any(problem.startswith("two masters in term 2") for problem in verdict.problems)

    other = [*LOG, event(4, 2, "MasterElected", term=1, node_id="n1")]
    verdict = check(history_of(), [], {"n0": LOG, "n1": other})
    assert any("two masters in term 1" in problem for problem in verdict.problems)


def test_different_logs_name_the_first_difference() -> None:
    other = [LOG[0], event(2, 2, "InstanceCreated", instance_id="i-7")]
    verdict = check(history_of(), [], {"n0": LOG, "n1": other})
    assert any("first difference at index 2" in problem for problem in verdict.problems)


def test_an_event_served_then_replaced_is_a_problem() -> None:
    served = [*LOG, event(4, 1, "NodeTimedOut", node_id="n2")]
    final = [*LOG, event(4, 2, "MasterElected", term=2, node_id="n1")]
    verdict = check(history_of(), [Observation("n0", served=served)], {"n0": final})
    assert verdict.problems == [
        "n0 served index 4 as t1 NodeTimedOut n2, its log now has t2 MasterElected n1"
    ]


class ScriptedNode:
    """Answers the writer's requests from a script: (status, body) or an exception."""

    node_id = "n0"

    def __init__(self, *answers: tuple[int, object] | OSError) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, path: str, body: object = None, timeout: float = 2.0) -> tuple[int, bytes]:
        self.requests.append((method, path))
        answer = self.answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        status, document = answer
        return status, json.dumps(document).encode()

    def get(self, path: str, timeout: float = 2.0) -> Any:
        raise AssertionError("the writer only writes")


def refused_at_connect() -> NodeApiError:
    error = NodeApiError("127.0.0.1:52415 in ns: refused")
    error.__cause__ = ConnectionRefusedError()
    return error


def test_the_writer_classifies_answers_as_jepsen_does() -> None:
    node = ScriptedNode(
        (503, {"error": {"code": "cluster_unavailable"}}),
        refused_at_connect(),
        TimeoutError("timed out"),
        (200, {"instance_id": "i-1"}),
        (500, {"error": "boom"}),
        (404, {"error": {"code": "instance_not_found"}}),
        (200, {"instance_id": "i-2"}),
    )
    writer = Writer(node, History(), threading.Event(), pause=0)
    outcomes = [(op.kind, op.instance_id, op.outcome) for op in (writer.step() for _ in range(7))]
    assert outcomes == [
        ("place", None, "fail"),  # refused by the cluster
        ("place", None, "fail"),  # nothing was sent
        ("place", None, "info"),  # may or may not have happened
        ("place", "i-1", "ok"),
        ("delete", "i-1", "info"),  # a 500: unknown, so the delete is tried again
        ("delete", "i-1", "fail"),  # 404: gone, nothing left to delete
        ("place", "i-2", "ok"),
    ]
    assert node.requests[4] == ("DELETE", "/instance/i-1")
    assert writer.unsettled == ["i-2"]
