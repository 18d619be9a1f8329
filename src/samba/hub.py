"""Downloads from the Hugging Face Hub, failing fast and saying how to work offline.

Every stage also takes local paths; these helpers are only reached for Hub ids.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from .errors import UserError

OFFLINE_HINT = (
    "To work offline, point params.yaml at local files: dataset.name at a directory holding "
    "train.txt, validation.txt and test.txt (or WikiText's wiki.{train,valid,test}.{raw,tokens}); "
    "dataset.tokenizer at a directory or tokenizer.json file; pretrained.model_name at a "
    "checkpoint directory (transformers or mamba-ssm format). Or set HF_HUB_OFFLINE=1 to use "
    "what the Hugging Face cache already holds.")
CACHE_HINT = ("HF_HUB_OFFLINE is set, so only the Hugging Face cache is read, and it does not hold this: "
              "fetch it once where the Hub can be reached, or point params.yaml at local files.")


def hint() -> str:
    """What to do instead, for the mode the Hub is used in."""
    return CACHE_HINT if hub_offline_mode() else OFFLINE_HINT


def _sentence(err: Exception) -> str:
    return str(err).strip().rstrip(".")


class HubUnavailableError(UserError, RuntimeError):
    """A Hub id was given but the Hub cannot be reached."""


def hub_offline_mode() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (https_proxy / http_proxy, else all_proxy;
    none for a host in no_proxy; lower case before upper case), as httpx reads it for
    huggingface_hub (both ask urllib.request.getproxies); None: a direct connection."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(urlsplit(url).scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")  # huggingface_hub's default


def hub_reachable(timeout: float = 5.0) -> bool:
    """Can the Hub's endpoint be reached the way huggingface_hub reaches it: directly (a TCP
    connection opens) or through the environment's proxy (the proxy opens a tunnel to it)?
    Each step waits at most ``timeout``; datasets, failing, retries for tens of seconds."""
    url = hub_endpoint()
    endpoint = urlsplit(url)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = hub_proxy(url)
    try:
        if proxy is None:
            with socket.create_connection((endpoint.hostname, port), timeout=timeout):
                return True
        return _through_proxy(urlsplit(proxy), endpoint, port, timeout)
    except OSError:  # refused, unresolvable, timed out, or the proxy's tunnel failed
        return False


def _through_proxy(proxy: SplitResult, endpoint: SplitResult, port: int, timeout: float) -> bool:
    """An http proxy must accept a CONNECT to an https endpoint (http.client sends it and raises
    OSError unless the answer is 200) or, for an http endpoint, forward a request to it (any
    answer of the endpoint's, not the proxy's own refusal). Another kind of proxy (socks, https)
    is only asked to accept a connection."""
    proxy_port = proxy.port or {"http": 80, "https": 443}.get(proxy.scheme, 1080)
    if proxy.scheme != "http":
        with socket.create_connection((proxy.hostname, proxy_port), timeout=timeout):
            return True
    headers = {}
    if proxy.username:  # credentials in the proxy's URL, as httpx sends them
        user_pass = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user_pass).decode()
    conn = http.client.HTTPConnection(proxy.hostname, proxy_port, timeout=timeout)
    try:
        if endpoint.scheme == "https":
            conn.set_tunnel(endpoint.hostname, port, headers)
            conn.connect()
            return True
        conn.request("HEAD", f"http://{endpoint.hostname}:{port}/", headers=headers)
        return conn.getresponse().status not in (407, 502, 503, 504)  # the proxy's own refusals
    finally:
        conn.close()


def require_hub(repo_id: str, what: str) -> None:
    """Raise a clear error unless the Hub (or offline mode with a cache) can serve ``repo_id``."""
    if not hub_offline_mode() and not hub_reachable():
        proxy = hub_proxy(hub_endpoint())
        through = f" through the proxy {urlsplit(proxy).hostname}:{urlsplit(proxy).port}" if proxy else ""
        raise HubUnavailableError(
            f"{what} {repo_id!r} is not a local path and the Hugging Face Hub cannot be reached{through}. "
            + OFFLINE_HINT)


def download_snapshot(repo_id: str, allow_patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    require_hub(repo_id, what)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as err:  # offline cache miss, unknown repo, network failure
        raise HubUnavailableError(f"could not fetch {what} {repo_id!r} from the Hub: {_sentence(err)}. "
                                  + hint()) from None


def download_file(repo_id: str, filename: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    require_hub(repo_id, what)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:
        raise HubUnavailableError(f"could not fetch {filename} of {what} {repo_id!r}: {_sentence(err)}. "
                                  + hint()) from None
