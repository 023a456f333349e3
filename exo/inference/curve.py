"""CURVE for the runner subprocess's plain (non-asyncio) ZeroMQ context: the bus's ZAP rule."""

from __future__ import annotations

import os

import zmq
from zmq.auth.thread import ThreadAuthenticator

from exo.core.security import CLUSTER_KEYS_ENVIRONMENT, BusSecurity, SameKeyOnly


def security_from_environment() -> BusSecurity:
    """The key pair the worker handed down (an open bus when it handed none)."""
    return BusSecurity.from_environment_value(os.environ.get(CLUSTER_KEYS_ENVIRONMENT))


def start_thread_authenticator(
    context: zmq.Context[zmq.Socket[bytes]], security: BusSecurity
) -> ThreadAuthenticator | None:
    """ZAP handler for the runner's CURVE server sockets: only the cluster's own key gets in."""
    if not security.enabled:
        return None
    assert security.public_key is not None
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=SameKeyOnly(security.public_key))
    return authenticator
