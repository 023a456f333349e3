"""Encoding and validated decoding of frames, with the drop counters that bad frames feed."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import msgspec

from exo.core.decoding import DECODE_ERRORS
from exo.core.messages import TOPIC_TYPES, ReplyEnvelope, RequestEnvelope

logger = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
_topic_decoders: dict[bytes, msgspec.msgpack.Decoder[Any]] = {
    topic: msgspec.msgpack.Decoder(message_type) for topic, message_type in TOPIC_TYPES.items()
}
_request_decoder = msgspec.msgpack.Decoder(RequestEnvelope)
_reply_decoder = msgspec.msgpack.Decoder(ReplyEnvelope)

LOG_INTERVAL_SECONDS = 1.0


class DropCounter:
    """Counts dropped frames by (socket, reason) and logs at most once a second."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._last_log = 0.0

    def drop(self, where: str, reason: str) -> None:
        self.counts[f"{where}: {reason}"] += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_SECONDS:
            self._last_log = now
            logger.warning("dropped a frame on %s (%s); totals %s", where, reason, dict(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_topic(topic: bytes, payload: bytes, drops: DropCounter, where: str) -> Any | None:
    decoder = _topic_decoders.get(topic)
    if decoder is None:
        drops.drop(where, "unknown topic")
        return None
    try:
        return decoder.decode(payload)
    except DECODE_ERRORS as error:
        drops.drop(where, f"invalid {topic.decode(errors='replace')}: {type(error).__name__}")
        return None


def decode_request(payload: bytes, drops: DropCounter, where: str) -> RequestEnvelope | None:
    try:
        return _request_decoder.decode(payload)
    except DECODE_ERRORS as error:
        drops.drop(where, f"invalid request: {type(error).__name__}")
        return None


def decode_reply(payload: bytes, drops: DropCounter, where: str) -> ReplyEnvelope | None:
    try:
        return _reply_decoder.decode(payload)
    except DECODE_ERRORS as error:
        drops.drop(where, f"invalid reply: {type(error).__name__}")
        return None
