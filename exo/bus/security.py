"""The cluster secret: every node derives the same ZeroMQ CURVE key pair from it.

Servers (ROUTER, PUB, PULL) accept only clients that prove they hold that key pair, and clients
need its public key to reach a server at all, so a node without the secret can neither join,
read a topic, nor inject a frame. The secret never goes on the wire or into mDNS.
"""

from __future__ import annotations

import hashlib
import secrets

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from exo.core.security import BusSecurity, SameKeyOnly

KEY_DERIVATION_LABEL = b"exo-bus-curve-v1:"
TAG_DERIVATION_LABEL = b"exo-cluster-tag-v1:"


def new_cluster_secret() -> str:
    """A fresh secret to hand to every node of a cluster (`exo --new-cluster-secret`)."""
    return secrets.token_urlsafe(32)


def derive_security(cluster_secret: str | None) -> BusSecurity:
    if not cluster_secret:
        return BusSecurity()
    raw_secret_key = hashlib.sha256(KEY_DERIVATION_LABEL + cluster_secret.encode()).digest()
    secret_key = z85.encode(raw_secret_key)
    return BusSecurity(public_key=zmq.curve_public(secret_key), secret_key=secret_key)


def cluster_tag(cluster_secret: str | None) -> str | None:
    """What mDNS announces so clusters with different secrets ignore each other; reveals no key."""
    if not cluster_secret:
        return None
    return hashlib.sha256(TAG_DERIVATION_LABEL + cluster_secret.encode()).hexdigest()[:32]


def start_authenticator(context: zmq.asyncio.Context, security: BusSecurity) -> AsyncioAuthenticator | None:
    """ZAP handler for every CURVE server socket of `context`: only the cluster's own key gets in."""
    if not security.enabled:
        return None
    assert security.public_key is not None
    authenticator = AsyncioAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=SameKeyOnly(security.public_key))
    return authenticator
