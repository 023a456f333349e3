"""Fixtures every API test module shares: one app per module over a fake node, reset per test.

A module that needs other defaults overrides `completion_settings`; one that needs another
starting point overrides `services` (taking this one as its argument).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from exo.api.app import create_app
from exo.api.completion import CompletionSettings
from tests.harness.api_checks import say_hello_world
from tests.harness.fakes import FakeNodeServices


@pytest.fixture(scope="module")
def completion_settings() -> CompletionSettings:
    return CompletionSettings()


@pytest.fixture(scope="module")
def app(completion_settings: CompletionSettings) -> Iterator[tuple[FakeNodeServices, TestClient[Any]]]:
    """One app per module: starting a test client per test was most of the API tests' time."""
    fake = FakeNodeServices()
    with TestClient(create_app(fake, completion_settings=completion_settings)) as test_client:
        yield fake, test_client


@pytest.fixture
def services(app: tuple[FakeNodeServices, TestClient[Any]]) -> FakeNodeServices:
    """A fresh fake in the object the app holds, scripted to say "Hello world!"."""
    fake, _ = app
    fake.__dict__.update(FakeNodeServices().__dict__)
    return say_hello_world(fake)


@pytest.fixture
def client(app: tuple[FakeNodeServices, TestClient[Any]], services: FakeNodeServices) -> TestClient[Any]:
    return app[1]
