"""Who forms a cluster, and when a `--force-master` node takes the lead, sans-IO.

A node with an empty log must not form its own cluster while another exists: after one liveness
window it bootstraps only if no peer it hears has a log or a master, and only the first of the
empty-log nodes heard does (forced nodes first, then by node id); the others wait for the master
to add them. A forced voter takes over (a leadership transfer, `Raft.campaign_now`) once its durable
log holds everything its master reported; the vote itself keeps every Raft rule.
"""

from __future__ import annotations

from collections.abc import Iterable

from exo.core.messages import Heartbeat


def should_bootstrap(node_id: str, force_master: bool, peers: Iterable[Heartbeat]) -> bool:
    """`peers`: heartbeats of the nodes heard within the last liveness window."""
    candidates = [(not force_master, node_id)]
    for heartbeat in peers:
        if heartbeat.rank.last_index > 0 or heartbeat.master_node_id is not None:
            return False  # a cluster exists: its master adds this node
        candidates.append((not heartbeat.rank.force_master, heartbeat.node_id))
    return min(candidates)[1] == node_id


def should_take_over(durable_index: int, master: Heartbeat | None, master_commit: int) -> bool:
    """A forced follower: whether its log is durable up to everything its master has (its last index
    as its heartbeat said, and the commit index its last message carried)."""
    return master is not None and durable_index >= max(master.rank.last_index, master_commit)
