"""The bus reads its SUB socket from the event loop's reader callback (exo/bus/transport.py): a
burst larger than one batch all arrives, in order, and a handler that raises is logged without
stopping the frames after it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import pytest
import zmq.asyncio

from exo.bus import transport
from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core import messages as m
from exo.core.raft_messages import RaftMessage, VoteRequested
from tests.harness.cluster_harness import free_port
from tests.test_bus_addressed import hello_handler

DEADLINE_SECONDS = 30.0


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Bus, Bus]]:
    context = zmq.asyncio.Context.instance()
    sender = Bus("s0", SocketFactory(context), bus_port=free_port(), bind_host="127.0.0.1")
    receiver = Bus("r0", SocketFactory(context), bus_port=free_port(), bind_host="127.0.0.1")
    yield sender, receiver
    for bus in (sender, receiver):
        with contextlib.suppress(Exception):
            await bus.close()


async def start(sender: Bus, receiver: Bus, handler: transport.TopicHandler) -> None:
    receiver.on_topic(m.TOPIC_ELECTION, handler)
    for bus in (sender, receiver):
        bus.on_request(lambda request, host, bus=bus: hello_handler(bus, request, host))
        await bus.start()
    sender.add_peer(f"127.0.0.1:{receiver.bus_port}")


def vote(term: int) -> VoteRequested:
    return VoteRequested(term=term, candidate_id="s0", to="r0", last_log_index=0, last_log_term=0)


async def until_heard(sender: Bus, heard: list[RaftMessage]) -> None:
    """A SUB socket misses what was published before it connected: probe until one arrives."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while not heard:
        assert loop.time() < deadline, "the receiver never connected"
        sender.publish(m.TOPIC_ELECTION, vote(0))
        await asyncio.sleep(0.02)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while not predicate():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_burst_larger_than_a_batch_arrives_whole_and_in_order(pair: tuple[Bus, Bus]) -> None:
    sender, receiver = pair
    heard: list[RaftMessage] = []
    await start(sender, receiver, heard.append)
    await until_heard(sender, heard)
    burst = 3 * transport.DRAIN_BATCH + 7
    for term in range(1, burst + 1):
        sender.publish(m.TOPIC_ELECTION, vote(term))  # no await between: they queue up together
    await wait_for(lambda: len([h for h in heard if h.term > 0]) == burst, f"heard {len(heard)}")
    assert [h.term for h in heard if h.term > 0] == list(range(1, burst + 1))


async def test_a_failing_handler_is_logged_and_reading_goes_on(
    pair: tuple[Bus, Bus], caplog: pytest.LogCaptureFixture
) -> None:
    sender, receiver = pair
    heard: list[RaftMessage] = []

    def handler(message: RaftMessage) -> None:
        heard.append(message)
        if message.term == 1:
            raise RuntimeError("handler bug")

    await start(sender, receiver, handler)
    await until_heard(sender, heard)
    with caplog.at_level(logging.ERROR, logger="exo.bus.transport"):
        for term in (1, 2, 3):
            sender.publish(m.TOPIC_ELECTION, vote(term))
        await wait_for(lambda: any(h.term == 3 for h in heard), f"heard {[h.term for h in heard]}")
    assert [h.term for h in heard if h.term > 0] == [1, 2, 3]
    assert "handler for election failed on VoteRequested" in caplog.text
    assert "handler bug" in caplog.text
