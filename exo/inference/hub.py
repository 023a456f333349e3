"""The Hugging Face Hub through `huggingface_hub`: what a model is made of, before fetching it.

Everything here blocks (HTTP): callers run it in a thread. The endpoint, token and offline switch
are read from the environment at call time (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`), not at
import time as huggingface_hub's own constants are, so a node and its tests can set them late.
Downloads never use Xet (`HF_HUB_DISABLE_XET` is set before huggingface_hub is imported): plain
HTTP ranges are what a Hub mirror serves, and what resumes from an `.incomplete` file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from exo.inference.manifest import INDEX_NAME, SUPPORT_FILES, HubFile, HubModel, is_weight_file, weight_map_of

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def configure_huggingface_hub() -> None:
    """No Xet and no tqdm bars, even when huggingface_hub was imported (by transformers) before
    this module set its environment: its constants are read at import, the checks at call time."""
    import huggingface_hub.constants
    from huggingface_hub.utils import disable_progress_bars

    huggingface_hub.constants.HF_HUB_DISABLE_XET = True
    disable_progress_bars()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise


def import_hub_client() -> None:
    """Import huggingface_hub's client ahead of the first download (a node does it at start, in
    a thread): ~0.2 s of CPU that a placement's download would otherwise pay on every node."""
    configure_huggingface_hub()
    import filelock  # noqa: F401  # pyright: ignore[reportUnusedImport]
    import huggingface_hub.file_download  # noqa: F401  # pyright: ignore[reportUnusedImport]
    from huggingface_hub import HfApi  # noqa: F401  # pyright: ignore[reportUnusedImport]


DEFAULT_ENDPOINT = "https://huggingface.co"
METADATA_TIMEOUT_SECONDS = 20.0


class HubError(Exception):
    """A Hub request that failed; `status` is the HTTP status the API answers with."""

    status = 502

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HubUnreachable(HubError):
    status = 503


class HubAccessDenied(HubError):
    status = 403


class HubNotFound(HubError):
    status = 404


class HubOffline(HubError):
    status = 404


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    token: str | None
    offline: bool

    @classmethod
    def from_environment(cls) -> HubSettings:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint, os.environ.get("HF_TOKEN") or None, offline)


@contextmanager
def hub_errors(repo_id: str, revision: str | None, settings: HubSettings) -> Iterator[None]:
    """Turn huggingface_hub's and httpx's exceptions into HubErrors whose message says what to do."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError as error:
        status = error.response.status_code if error.response is not None else 401
        told = "the token in HF_TOKEN has no access" if settings.token else "no HF_TOKEN is set"
        raise HubAccessDenied(
            f"{repo_id} is a gated model ({status}): {told}. Accept its terms on the Hub, then set "
            "HF_TOKEN to a token of an account with access"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubNotFound(f"{repo_id} has no revision {revision!r} on {settings.endpoint}") from None
    except errors.RepositoryNotFoundError:
        private = "" if settings.token else " (if it is private, set HF_TOKEN)"
        raise HubNotFound(f"no model {repo_id!r} on {settings.endpoint}{private}") from None
    except errors.LocalEntryNotFoundError as error:
        raise HubUnreachable(f"cannot reach the Hub at {settings.endpoint}: {error}") from None
    except errors.EntryNotFoundError as error:
        raise HubNotFound(f"{repo_id}: a file is missing on the Hub: {error}") from None
    except errors.HfHubHTTPError as error:
        raise HubError(f"the Hub at {settings.endpoint} refused: {error}") from None
    except OSError as error:
        raise HubUnreachable(f"cannot reach the Hub at {settings.endpoint}: {error}") from None
    except Exception as error:
        if type(error).__module__.startswith(("httpx", "httpcore")):
            raise HubUnreachable(f"cannot reach the Hub at {settings.endpoint}: {error!r}") from None
        raise


def fetch_hub_model(repo_id: str, revision: str | None, settings: HubSettings, scratch: Path) -> HubModel:
    """The model's files, sizes, sha256 and tensor sizes, fetching only metadata (config.json, the
    index and the safetensors headers, by range). `scratch` is a folder for those small files."""
    if settings.offline:
        raise HubOffline(
            f"model {repo_id!r} is not in the models dir and HF_HUB_OFFLINE is set: nothing is fetched"
        )
    configure_huggingface_hub()
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    with hub_errors(repo_id, revision, settings):
        info = api.model_info(
            repo_id, revision=revision, files_metadata=True, timeout=METADATA_TIMEOUT_SECONDS
        )
        commit = info.sha
        if commit is None:
            raise HubError(f"the Hub gave no commit for {repo_id}")
        files: list[HubFile] = []
        for sibling in info.siblings or []:
            name = sibling.rfilename
            if name not in SUPPORT_FILES and not (is_weight_file(name) and name.startswith("model")):
                continue
            size = sibling.size if sibling.size is not None else 0
            sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
            files.append(HubFile(name, size, sha256))
        names = {hub_file.path for hub_file in files}
        if "config.json" not in names:
            raise HubNotFound(f"{repo_id} has no config.json: not a model exo can run")
        weights = sorted(name for name in names if is_weight_file(name))
        if not weights:
            raise HubNotFound(f"{repo_id} has no model*.safetensors weights (exo runs safetensors only)")

        def small(name: str) -> str:
            path = hf_hub_download(
                repo_id, name, revision=commit, local_dir=scratch, endpoint=settings.endpoint,
                token=settings.token,
            )  # fmt: skip
            return Path(path).read_bytes().decode("utf-8")  # as served (no newline translation)

        config_text = small("config.json")
        config = json.loads(config_text)
        if not isinstance(config, dict):
            raise HubError(f"{repo_id}: config.json is not an object")
        weight_map = weight_map_of(small(INDEX_NAME)) if INDEX_NAME in names else {}
        metadata = api.get_safetensors_metadata(repo_id, revision=commit)
        tensors: list[tuple[str, str, int]] = []
        for file_name, file_metadata in sorted(metadata.files_metadata.items()):
            for tensor_name, tensor in file_metadata.tensors.items():
                start, end = tensor.data_offsets
                tensors.append((tensor_name, str(tensor.dtype), int(end) - int(start)))
                weight_map.setdefault(tensor_name, file_name)
    return HubModel(
        repo_id=repo_id,
        revision=revision or "main",
        commit=commit,
        files=sorted(files, key=lambda hub_file: hub_file.path),
        tensors=tensors,
        weight_map=weight_map,
        config=config,
        config_text=config_text,
    )
