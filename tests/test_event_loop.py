"""The node's event loop choice (exo/node/event_loop.py): uvloop when asked or available, asyncio's
own when asked, a clear error for anything else, and zmq.asyncio sockets working on it (uvloop is a
dependency wherever the project runs its tests)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from exo.node import event_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_choice_runs_asyncio_loop() -> None:
    assert event_loop.loop_factory("asyncio") is None
    assert event_loop.run(_loop_module(), "asyncio").startswith("asyncio")


def test_environment_picks_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENVIRONMENT, " AsyncIO ")
    assert event_loop.loop_factory() is None


@pytest.mark.parametrize("value", ["tokio", "1", "uv loop"])
def test_bad_choice_is_refused_with_the_variable_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(event_loop.ENVIRONMENT, value)
    with pytest.raises(SystemExit, match=f"EXO_EVENT_LOOP={value!r} is not one of auto, uvloop, asyncio"):
        event_loop.run(_loop_module())


def test_auto_without_uvloop_falls_back_to_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = event_loop.importlib.import_module

    def no_uvloop(name: str, package: str | None = None) -> object:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, package)

    monkeypatch.setattr(event_loop.importlib, "import_module", no_uvloop)
    assert event_loop.loop_factory("auto") is None
    with pytest.raises(SystemExit, match="uvloop is not installed"):
        event_loop.loop_factory("uvloop")


def test_auto_runs_uvloop_and_zmq_asyncio_works_on_it() -> None:
    async def round_trip() -> tuple[str, bytes]:
        context = zmq.asyncio.Context()
        pull = context.socket(zmq.PULL)
        push = context.socket(zmq.PUSH)
        try:
            port = pull.bind_to_random_port("tcp://127.0.0.1")
            push.connect(f"tcp://127.0.0.1:{port}")
            await push.send(b"ping")
            received = await asyncio.wait_for(pull.recv(), 10)
        finally:
            push.close(0)
            pull.close(0)
            context.term()
        return type(asyncio.get_running_loop()).__module__, received

    module, received = event_loop.run(round_trip(), "auto")
    assert module.startswith("uvloop")
    assert received == b"ping"
