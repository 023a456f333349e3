"""Validated decoding per topic: every malformed frame is dropped and counted, none raises."""

from __future__ import annotations

import msgspec
import pytest

from exo.bus.codec import DropCounter, decode_reply, decode_request, decode_topic, encode
from exo.core import messages as m

INVALID_UTF8_LOCAL_EVENTS = b"\x83\xa4type\xafL\xbecalEventsSent\xa7no\x0ee_id\xa1x\xa6events\x90"


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (m.TOPIC_LOCAL_EVENTS, INVALID_UTF8_LOCAL_EVENTS),  # found by the fuzz test
        (m.TOPIC_CONNECTION, b"\xc1"),
        (m.TOPIC_CONNECTION, msgspec.msgpack.encode({"type": "Heartbeat", "node_id": 1})),
        (m.TOPIC_ELECTION, encode(m.DeleteInstance("i"))),  # a command on the wrong topic
        (b"no_such_topic", b""),
    ],
)
def test_bad_topic_frames_are_dropped_and_counted(topic: bytes, payload: bytes) -> None:
    """Behaviour, not the library's exception class (msgspec 0.23 reports invalid UTF-8 as a
    DecodeError where earlier releases raised UnicodeDecodeError): the frame is dropped, counted
    under the socket it came from, and the next good frame still decodes."""
    drops = DropCounter()
    assert decode_topic(topic, payload, drops, "sub") is None
    assert drops.total == 1
    assert next(iter(drops.counts)).startswith("sub: ")
    heartbeat = m.Heartbeat("a", 1, "a", m.Rank(False, 3, "a"), 52414)
    assert decode_topic(m.TOPIC_CONNECTION, encode(heartbeat), drops, "sub") == heartbeat
    assert drops.total == 1


def test_bad_requests_and_replies_are_dropped_and_counted() -> None:
    drops = DropCounter()
    assert decode_request(b"\xa2\xbe\xff", drops, "router") is None
    assert decode_reply(msgspec.msgpack.encode([1, {"type": "Nope"}]), drops, "dealer") is None
    assert drops.total == 2


def test_valid_frames_round_trip() -> None:
    drops = DropCounter()
    heartbeat = m.Heartbeat("a", 1, "a", m.Rank(False, 3, "a"), 52414)
    assert decode_topic(m.TOPIC_CONNECTION, encode(heartbeat), drops, "sub") == heartbeat
    envelope = m.RequestEnvelope(5, m.EventsRequested(10))
    assert decode_request(encode(envelope), drops, "router") == envelope
    assert drops.total == 0
