"""Downloads from the Hugging Face Hub, failing fast and saying how to work offline.

Every stage also takes local paths; these helpers are only reached for Hub ids.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

OFFLINE_HINT = (
    "To work offline, point params.yaml at local files: dataset.name at a directory holding "
    "train.txt, validation.txt and test.txt (or WikiText's wiki.{train,valid,test}.{raw,tokens}); "
    "dataset.tokenizer at a directory or tokenizer.json file; pretrained.model_name at a "
    "checkpoint directory (transformers or mamba-ssm format). Or set HF_HUB_OFFLINE=1 to use "
    "what the Hugging Face cache already holds.")


class HubUnavailableError(UserError, RuntimeError):
    """A Hub id was given but the Hub cannot be reached."""


def hub_offline_mode() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 5.0) -> bool:
    """Can a TCP connection to the Hub's endpoint be opened? (datasets retries for tens of
    seconds on its own when it cannot; this answers in at most ``timeout``.)"""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(repo_id: str, what: str) -> None:
    """Raise a clear error unless the Hub (or offline mode with a cache) can serve ``repo_id``."""
    if not hub_offline_mode() and not hub_reachable():
        raise HubUnavailableError(
            f"{what} {repo_id!r} is not a local path and the Hugging Face Hub cannot be reached. "
            + OFFLINE_HINT)


def download_snapshot(repo_id: str, allow_patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    require_hub(repo_id, what)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as err:  # offline cache miss, unknown repo, network failure
        raise HubUnavailableError(f"could not fetch {what} {repo_id!r} from the Hub: {err}. "
                                  + OFFLINE_HINT) from None


def download_file(repo_id: str, filename: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    require_hub(repo_id, what)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:
        raise HubUnavailableError(f"could not fetch {filename} of {what} {repo_id!r}: {err}. "
                                  + OFFLINE_HINT) from None
