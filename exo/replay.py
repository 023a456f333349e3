"""`exo-replay PATH`: rebuild the cluster state from an event log, offline and read-only.

It folds the log with the core's one fold (exo.core.fold, as a node does on start-up); the rest
is the command line: a summary, `--json` (the state document, equal to the node's `GET /state`
at that index), `--list`, `--verify`.

Exit codes: 0 ok; 1 the log is damaged (a hole, an event that does not decode), naming the
first bad index; 2 the file cannot be used (missing, not an exo store, corrupt) or bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Sequence

import msgspec

from exo.core.events import IndexedEvent, event_type_name
from exo.core.fold import LogFold, LogGapError
from exo.core.state import State, state_document
from exo.store.base import StoreError
from exo.store.reader import EventDecodeError, LogReader

SHORT_PAYLOAD_CHARS = 100


def rebuild(reader: LogReader, until: int | None = None) -> State:
    """The state after index `until` (whole log when None), from the newest snapshot at or before it.

    Raises LogGapError when the log cannot reach that index, EventDecodeError on a bad event.
    """
    snapshot = reader.load_snapshot(until)
    fold = LogFold(snapshot.state if snapshot is not None else None)
    fold.feed(reader.events(fold.last_event_index + 1, until))
    reach = reader.last_index() if until is None else min(until, reader.last_index())
    return fold.state(reach, reader.next_event_index(fold.last_event_index))


def summary(state: State, reader: LogReader, until: int | None) -> str:
    count, lowest, highest = reader.index_range()
    snapshots = reader.snapshot_indices()
    stored = f"{count} events stored" + (f" (indices {lowest}..{highest})" if count else "")
    snapshot_text = ", ".join(map(str, snapshots[-3:])) if snapshots else "none"
    node_statuses = Counter(node.status for node in state.nodes.values())
    instance_statuses = Counter(instance.status for instance in state.instances.values())
    lines = [
        f"{reader.path}: {stored}; snapshots at: {snapshot_text}",
        f"last index: {state.last_event_index}   term: {state.term}   master: {state.master_node_id or '-'}",
        f"nodes: {len(state.nodes)}{_by_status(node_statuses)}",
        f"instances: {len(state.instances)}{_by_status(instance_statuses)}",
        "stored events by type" + (f" (up to index {until})" if until is not None else "") + ":",
    ]
    counts = reader.counts_by_type(until)
    width = max((len(name) for name in counts), default=0)
    lines += [
        f"  {name:<{width}}  {counts[name]:>10}" for name in sorted(counts, key=lambda n: (-counts[n], n))
    ]
    return "\n".join(lines)


def list_line(indexed: IndexedEvent) -> str:
    fields = msgspec.to_builtins(indexed.event)
    fields.pop("type", None)
    payload = msgspec.json.encode(fields).decode()
    if len(payload) > SHORT_PAYLOAD_CHARS:
        payload = payload[: SHORT_PAYLOAD_CHARS - 3] + "..."
    return f"{indexed.index:>9} {indexed.term:>4} {event_type_name(indexed.event):<19} {payload}"


def verify(reader: LogReader, until: int | None) -> tuple[int, str | None]:
    """(events checked, the first problem or None). Indices must run without a hole from 1, or
    from just after the snapshot the log begins at; every event and snapshot must decode."""
    _, lowest, _ = reader.index_range()
    snapshots = reader.snapshot_indices()
    for index in snapshots:
        if until is None or index <= until:
            try:
                reader.load_snapshot(index)
            except StoreError as error:
                return 0, f"bad snapshot at index {index}: {error}"
    if lowest > 1 and lowest - 1 not in snapshots:
        return 0, f"bad index 1: missing (the log starts at {lowest} and has no snapshot at {lowest - 1})"
    expected = lowest if lowest > 1 else 1
    checked = 0
    try:
        for indexed in reader.events(0, until):
            if indexed.index != expected:
                return checked, f"bad index {expected}: missing (the log continues at {indexed.index})"
            expected += 1
            checked += 1
    except EventDecodeError as error:
        return checked, f"bad index {error.index}: {error.detail}"
    return checked, None


def _by_status(statuses: Counter[str]) -> str:
    if not statuses:
        return ""
    return " (" + ", ".join(f"{status} {statuses[status]}" for status in sorted(statuses)) + ")"


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exo-replay", description="Rebuild the exo cluster state from an event log (read-only)."
    )
    parser.add_argument("path", metavar="PATH", help="events.db path or store URL (sqlite+aiosqlite:///PATH)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the state document (as GET /state)")
    mode.add_argument("--list", action="store_true", help="print one event per line")
    mode.add_argument(
        "--verify", action="store_true", help="check indices run without a hole and events decode"
    )
    parser.add_argument("--until", type=_non_negative, metavar="N", help="stop after index N")
    return parser


def _run(arguments: argparse.Namespace, out: Output) -> int:
    with LogReader.open(arguments.path) as reader:
        if arguments.verify:
            checked, problem = verify(reader, arguments.until)
            if problem is not None:
                out.error(problem)
                return 1
            out.line(f"ok: {checked} events")
            return 0
        # Only committed events: a node's uncommitted tail may still be replaced by the master's.
        until = arguments.until
        committed = reader.commit_index()
        if committed is not None:
            until = committed if until is None else min(until, committed)
        if arguments.list:
            for indexed in reader.events(0, until):
                out.line(list_line(indexed))
            return 0
        state = rebuild(reader, until)
        if arguments.json:
            out.raw(state_document(state))  # exactly the bytes GET /state serves, no newline added
        else:
            out.line(summary(state, reader, until))
        return 0


class Output:
    def line(self, text: str) -> None:
        sys.stdout.write(text + "\n")

    def raw(self, data: bytes) -> None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)

    def error(self, text: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"exo-replay: {text}\n")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    out = Output()
    try:
        return _run(arguments, out)
    except EventDecodeError as error:
        out.error(f"bad index {error.index}: {error.detail}")
        return 1
    except LogGapError as error:
        out.error(f"bad index {error.expected}: missing ({error.detail})")
        return 1
    except StoreError as error:
        out.error(str(error))
        return 2
    except BrokenPipeError:
        # `exo-replay --list | head`: the reader went away, which is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
