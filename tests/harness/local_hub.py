"""A local stand-in for the Hugging Face Hub: the subset of its HTTP API that huggingface_hub uses.

Tests point `HF_ENDPOINT` at it so no test ever reaches the internet. It serves every folder
`ROOT/org/name/` as the model repo `org/name` at revision `main` (and at its commit hash):

- `GET /api/models/{repo}[/revision/{rev}]` (model info; `?blobs=true` adds sizes, blob ids and
  LFS sha256, as `HfApi.model_info(files_metadata=True)` asks),
- `GET /api/models/{repo}/tree/{rev}` (what `snapshot_download` lists),
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with `Range`, `ETag`, `X-Repo-Commit`, `X-Linked-Etag`
  and `X-Linked-Size`, as the real Hub answers (no Xet headers: downloads use plain HTTP),
- 401/403 with `X-Error-Code: GatedRepo` for gated repos, 404 with `RepoNotFound`,
  `RevisionNotFound` or `EntryNotFound`.

`*.safetensors` files are LFS files (their ETag is their sha256), the rest are git blobs (sha1 of
the git blob). It counts the bytes it serves, and can be told to cut a transfer short or to serve
slowly, which the failure tests and the benchmark use.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    oid: str  # git blob sha1
    sha256: str | None  # LFS files only


@dataclass
class HubStats:
    bytes_served: int = 0
    bytes_by_file: dict[str, int] = field(default_factory=dict[str, int])
    # Of those, bytes sent for ranges from offset 0 shorter than the file: huggingface_hub reading
    # safetensors headers (metadata), not a download (which asks the whole file, or resumes
    # from an offset past 0). Counted when the body ends, which may be after the client closed.
    header_bytes: int = 0
    # Bodies of a whole file (not a range): how many times each file was fetched in full.
    whole_files: dict[str, int] = field(default_factory=dict[str, int])
    requests: list[str] = field(default_factory=list[str])


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LocalHub:
    """The server. `with LocalHub(root) as hub:` then `hub.endpoint` is the `HF_ENDPOINT` to use."""

    def __init__(self, root: Path, *, gated: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.gated = dict(gated or {})  # repo id -> the token that may read it
        self.stats = HubStats()
        self.lock = threading.Lock()
        # Fault injection: resolve GET bodies stop (the connection closes) once this many more
        # bytes have been served in all, as if the downloading node had died (None: never).
        self.cut_after_bytes: int | None = None
        # "org/name/path" of files whose next full GET sends one byte flipped (a corrupt transfer).
        self.corrupt_next: set[str] = set()
        # Bytes per second for resolve GET bodies (None: as fast as it goes).
        self.throttle_bytes_per_second: float | None = None
        self._files: dict[str, dict[str, HubFile]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def rescan(self) -> None:
        """Forget cached file listings (after a test changed a repo's files)."""
        with self.lock:
            self._files.clear()

    # --- repos ---------------------------------------------------------------------------------

    def repo_dir(self, repo_id: str) -> Path | None:
        parts = repo_id.split("/")
        if len(parts) != 2 or any(not part or part.startswith(".") for part in parts):
            return None
        folder = self.root / parts[0] / parts[1]
        return folder if folder.is_dir() else None

    def files(self, repo_id: str) -> dict[str, HubFile]:
        with self.lock:
            cached = self._files.get(repo_id)
        if cached is not None:
            return cached
        folder = self.repo_dir(repo_id)
        assert folder is not None
        listing: dict[str, HubFile] = {}
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            name = path.relative_to(folder).as_posix()
            data = path.read_bytes() if not name.endswith(".safetensors") else b""
            lfs = name.endswith(".safetensors")
            oid = _git_blob_oid(data) if not lfs else hashlib.sha1(name.encode()).hexdigest()
            listing[name] = HubFile(name, path.stat().st_size, oid, _sha256(path) if lfs else None)
        with self.lock:
            self._files[repo_id] = listing
        return listing

    def commit(self, repo_id: str) -> str:
        digest = hashlib.sha1(repo_id.encode())
        for hub_file in self.files(repo_id).values():
            digest.update(f"{hub_file.path}:{hub_file.size}:{hub_file.sha256 or hub_file.oid}".encode())
        return digest.hexdigest()

    def model_size(self, repo_id: str) -> int:
        return sum(hub_file.size for hub_file in self.files(repo_id).values())

    def count(self, path: str, sent: int, *, header: bool = False) -> None:
        with self.lock:
            if header:
                self.stats.header_bytes += sent
            self.stats.bytes_served += sent
            self.stats.bytes_by_file[path] = self.stats.bytes_by_file.get(path, 0) + sent


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        # --- plumbing ------------------------------------------------------------------------

        def _error(self, status: int, code: str | None, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, document: object) -> None:
            body = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self, repo_id: str) -> bool:
            """False after answering 401/403 for a gated repo the request may not read."""
            token = hub.gated.get(repo_id)
            if token is None:
                return True
            supplied = self.headers.get("Authorization", "")
            if not supplied:
                self._error(
                    401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access."
                )
                return False
            if supplied != f"Bearer {token}":
                message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                self._error(403, "GatedRepo", message)
                return False
            return True

        def _revision_ok(self, repo_id: str, revision: str) -> bool:
            if revision in ("main", hub.commit(repo_id)):
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return False

        def _route(self, *, head: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            with hub.lock:
                hub.stats.requests.append(f"{self.command} {self.path}")
            if path.startswith("/api/models/"):
                self._api(path.removeprefix("/api/models/"), query)
                return
            match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if match is None:
                self._error(404, None, "Not Found")
                return
            repo_id, revision, file_path = match.groups()
            if hub.repo_dir(repo_id) is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return
            if not self._authorized(repo_id) or not self._revision_ok(repo_id, revision):
                return
            hub_file = hub.files(repo_id).get(file_path)
            if hub_file is None:
                self._error(404, "EntryNotFound", f"{file_path} does not exist on {revision}")
                return
            self._serve_file(repo_id, hub_file, head=head)

        def _api(self, rest: str, query: dict[str, list[str]]) -> None:
            parts = rest.split("/")
            repo_id = "/".join(parts[:2])
            if len(parts) < 2 or hub.repo_dir(repo_id) is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return
            if not self._authorized(repo_id):
                return
            tail = parts[2:]
            revision = "main"
            if len(tail) >= 2 and tail[0] in ("revision", "tree"):
                revision = tail[1]
            if not self._revision_ok(repo_id, revision):
                return
            files = hub.files(repo_id)
            if tail and tail[0] == "tree":
                self._json([_tree_entry(hub_file) for hub_file in files.values()])
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            self._json(
                {
                    "_id": repo_id,
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": hub.commit(repo_id),
                    "private": False,
                    "gated": "manual" if repo_id in hub.gated else False,
                    "disabled": False,
                    "tags": [],
                    "siblings": [_sibling(hub_file, blobs=blobs) for hub_file in files.values()],
                }
            )

        def _serve_file(self, repo_id: str, hub_file: HubFile, *, head: bool) -> None:
            start, end = 0, hub_file.size - 1
            requested = self.headers.get("Range")
            partial = False
            if requested:
                match = _RANGE.match(requested.strip())
                if match is None or int(match.group(1)) >= max(1, hub_file.size):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{hub_file.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(match.group(1))
                end = min(int(match.group(2)), hub_file.size - 1) if match.group(2) else hub_file.size - 1
                partial = True
            length = max(0, end - start + 1)
            etag = hub_file.sha256 or hub_file.oid
            self.send_response(206 if partial else 200)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", hub.commit(repo_id))
            if hub_file.sha256 is not None:
                self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
                self.send_header("X-Linked-Size", str(hub_file.size))
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end}/{hub_file.size}")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if head:
                return
            folder = hub.repo_dir(repo_id)
            assert folder is not None
            name = f"{repo_id}/{hub_file.path}"
            if start == 0 and length == hub_file.size:
                with hub.lock:
                    hub.stats.whole_files[name] = hub.stats.whole_files.get(name, 0) + 1
            header = partial and start == 0 and length < hub_file.size
            self._send_body(folder / hub_file.path, name, start, length, header=header)

        def _send_body(self, path: Path, name: str, start: int, length: int, *, header: bool) -> None:
            import time  # the throttle's pacing only; never used to synchronise a test

            with hub.lock:
                corrupt = name in hub.corrupt_next and start == 0
                hub.corrupt_next.discard(name)
            sent = 0
            began = time.monotonic()
            with path.open("rb") as file:
                file.seek(start)
                while sent < length:
                    # Throttled, a tenth of a second's bytes at a time: a small file arrives
                    # over time too, instead of in one write followed by a pause.
                    rate = hub.throttle_bytes_per_second
                    step = CHUNK // 4 if not rate else min(CHUNK // 4, max(4096, int(rate) // 10))
                    size = min(step, length - sent)
                    with hub.lock:
                        if hub.cut_after_bytes is not None:
                            size = min(size, hub.cut_after_bytes)
                            hub.cut_after_bytes -= size
                    if size <= 0:
                        self.close_connection = True
                        hub.count(name, sent, header=header)
                        return  # the client sees the body end early
                    chunk = file.read(size)
                    if corrupt and chunk:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                        corrupt = False
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        hub.count(name, sent, header=header)
                        return
                    sent += len(chunk)
                    rate = hub.throttle_bytes_per_second
                    if rate:
                        ahead = sent / rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
            hub.count(name, sent, header=header)

    return Handler


def _lfs(hub_file: HubFile) -> dict[str, object] | None:
    if hub_file.sha256 is None:
        return None
    return {"size": hub_file.size, "sha256": hub_file.sha256, "oid": hub_file.sha256, "pointerSize": 134}


def _sibling(hub_file: HubFile, *, blobs: bool) -> dict[str, object]:
    if not blobs:
        return {"rfilename": hub_file.path}
    sibling: dict[str, object] = {"rfilename": hub_file.path, "size": hub_file.size, "blobId": hub_file.oid}
    if (lfs := _lfs(hub_file)) is not None:
        sibling["lfs"] = lfs
    return sibling


def _tree_entry(hub_file: HubFile) -> dict[str, object]:
    entry: dict[str, object] = {
        "type": "file",
        "path": hub_file.path,
        "size": hub_file.size,
        "oid": hub_file.oid,
    }
    if (lfs := _lfs(hub_file)) is not None:
        entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
    return entry
