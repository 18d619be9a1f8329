"""The Hugging Face route: the cache the libraries read offline, one token stream from local
files and from the Hub's rows, and the reachability check through a proxy."""

from __future__ import annotations

import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from samba.config import DatasetConfig
from samba.data import load_split, prepare_tokens, read_split_lines
from samba.hub import HubUnavailableError, hub_reachable, require_hub

from conftest import WIKITEXT_FILES, tool_env


def test_the_hub_cache_is_what_huggingface_hub_reads(hf_cache):
    # the layout add_to_hub_cache writes by hand, read back by huggingface_hub itself
    from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

    hub, local, defaults = hf_cache["hf_home"] / "hub", hf_cache["local"], hf_cache["defaults"]
    scanned = {repo.repo_id: repo for repo in scan_cache_dir(hub).repos}
    tokenizer_id, model_id = defaults["dataset"]["tokenizer"], defaults["pretrained"]["model_name"]
    assert set(scanned) == {tokenizer_id, model_id}
    assert all(r.repo_type == "model" and {"main"} == {ref for rev in r.revisions for ref in rev.refs}
               for r in scanned.values())
    got = hf_hub_download(tokenizer_id, "tokenizer.json", cache_dir=hub, local_files_only=True)
    assert Path(got).read_bytes() == (local / "tokenizer/tokenizer.json").read_bytes()
    snapshot = Path(snapshot_download(model_id, cache_dir=hub, local_files_only=True,
                                      allow_patterns=["config.json", "*.safetensors"]))
    for name in ("config.json", "model.safetensors"):
        assert (snapshot / name).read_bytes() == (local / "mamba" / name).read_bytes()


HUB_ROUTE = """
import json, sys
from samba.config import DatasetConfig
from samba.data import prepare_tokens, read_split_lines
dataset = DatasetConfig(**json.loads(sys.argv[1]))
lines, source = read_split_lines(dataset)
prepare_tokens(dataset, sys.argv[2])
print(json.dumps({"lines": lines, "source": source}))
"""


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_local_files_and_hub_rows_give_one_token_stream(hf_cache, tmp_path):
    # The Hub route (datasets.load_dataset("wikitext", ...) and the tokenizer from the hub cache,
    # offline, in a process of its own as the stage runs it) against the local route over the
    # raw files the cached rows were made from: the same lines, the same token ids.
    local = hf_cache["local"]
    proc = subprocess.run([sys.executable, "-c", HUB_ROUTE, json.dumps(hf_cache["defaults"]["dataset"]),
                           str(tmp_path / "hub")], capture_output=True, text=True, timeout=300,
                          env=tool_env(**hf_cache["env"], HF_ENDPOINT="http://127.0.0.1:9"))
    assert proc.returncode == 0, proc.stderr
    hub = json.loads(proc.stdout.splitlines()[-1])
    assert hub["source"] == "hub:wikitext/wikitext-2-raw-v1"
    assert hub["lines"] == hf_cache["rows"]  # what the datasets cache holds, unchanged
    dataset = DatasetConfig(name=str(local / "corpus"), tokenizer=str(local / "tokenizer"))
    lines, _ = read_split_lines(dataset)
    assert lines == hub["lines"]
    prepare_tokens(dataset, tmp_path / "local")
    for split in ("train", "validation", "test"):
        ids = load_split(tmp_path / "local", split)
        assert np.array_equal(ids, load_split(tmp_path / "hub", split)), split
    # the files do hold WikiText's blank lines, which tokenize to something when kept as " \n"
    from tokenizers import Tokenizer

    raw = (local / "corpus" / WIKITEXT_FILES["test"]).read_text()
    tok = Tokenizer.from_file(str(local / "tokenizer/tokenizer.json"))
    kept = sum(len(e.ids) for e in tok.encode_batch(raw.splitlines(keepends=True), add_special_tokens=False))
    assert raw.count(" \n \n") > 5 and kept > len(load_split(tmp_path / "local", "test"))


# ----------------------------------------------------------------------------- proxies

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "REQUEST_METHOD")


@pytest.fixture
def proxy_env(monkeypatch):
    """No proxy variable of the caller's, in either case; the Hub at a host that never resolves."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    return monkeypatch


class FakeProxy(socketserver.ThreadingTCPServer):
    """On 127.0.0.1: records each request (method and target) and its headers and answers it
    with ``status``, as a proxy answers a CONNECT (200: the tunnel is open) or a forwarded request."""

    daemon_threads = True

    def __init__(self, status: int = 200):
        self.status, self.requests, self.headers = status, [], []
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            head = self.rfile.readline().decode().strip()
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                self.server.headers.append(line.decode().strip())
            self.server.requests.append(" ".join(head.split()[:2]))  # method and target
            reason = "Connection established" if self.server.status == 200 else "Refused"
            self.wfile.write(f"HTTP/1.1 {self.server.status} {reason}\r\nContent-Length: 0\r\n\r\n".encode())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def fake_proxy():
    servers = []

    def start(status: int = 200) -> FakeProxy:
        servers.append(FakeProxy(status))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_hub_is_reached_through_the_proxy_the_environment_names(proxy_env, fake_proxy):
    proxy = fake_proxy()
    proxy_env.setenv("HTTPS_PROXY", proxy.url)
    assert hub_reachable(timeout=2)  # hub.invalid does not resolve here: only the proxy can reach it
    assert proxy.requests == ["CONNECT hub.invalid:443"]
    require_hub("state-spaces/mamba-130m-hf", "model checkpoint")  # so a Hub id is not refused
    # lower case wins, as in httpx; ALL_PROXY serves when no scheme's own proxy is named
    proxy_env.setenv("https_proxy", "http://127.0.0.1:9")
    assert not hub_reachable(timeout=2)
    proxy_env.delenv("https_proxy")
    proxy_env.delenv("HTTPS_PROXY")
    proxy_env.setenv("ALL_PROXY", proxy.url)
    assert hub_reachable(timeout=2) and len(proxy.requests) == 3  # hub_reachable, require_hub, this one


def test_an_http_endpoint_is_asked_for_through_the_proxy(proxy_env, fake_proxy):
    proxy = fake_proxy()
    proxy_env.setenv("HF_ENDPOINT", "http://hub.invalid:8080")
    proxy_env.setenv("HTTP_PROXY", proxy.url)
    assert hub_reachable(timeout=2)
    assert proxy.requests == ["HEAD http://hub.invalid:8080/"]
    for status in (407, 502):  # a proxy that asks for credentials, or cannot reach the endpoint
        refusing = fake_proxy(status=status)
        proxy_env.setenv("HTTP_PROXY", refusing.url)
        assert not hub_reachable(timeout=2) and refusing.requests == ["HEAD http://hub.invalid:8080/"]


def test_no_proxy_goes_direct(proxy_env, fake_proxy):
    proxy = fake_proxy()
    proxy_env.setenv("HTTPS_PROXY", proxy.url)
    proxy_env.setenv("NO_PROXY", "localhost,.example.org,hub.invalid")
    start = time.monotonic()
    assert not hub_reachable(timeout=2)
    assert time.monotonic() - start < 2 and proxy.requests == []


def test_a_refusing_or_absent_proxy_is_unreachable_within_the_timeout(proxy_env, fake_proxy):
    refusing = fake_proxy(status=403)  # a proxy that will not open the tunnel
    proxy_env.setenv("HTTPS_PROXY", refusing.url)
    assert not hub_reachable(timeout=2) and refusing.requests == ["CONNECT hub.invalid:443"]
    proxy_env.setenv("HTTPS_PROXY", refusing.url.replace("://", "://user:secret@"))
    with pytest.raises(HubUnavailableError, match=r"cannot be reached through the proxy 127\.0\.0\.1:\d+\. ") as err:
        require_hub("wikitext", "dataset")
    assert "secret" not in str(err.value)
    assert "Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=" in refusing.headers  # base64 of user:secret
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert not hub_reachable(timeout=2)
    assert time.monotonic() - start < 2


def test_a_silent_proxy_is_given_up_after_the_timeout(proxy_env):
    with socket.socket() as silent:  # accepts the connection (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        assert not hub_reachable(timeout=0.5)
        assert 0.4 < time.monotonic() - start < 2


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_offline_mode_with_nothing_cached_says_so_once(tmp_path, monkeypatch):
    from samba.hub import HubUnavailableError, download_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty/hub"))
    with pytest.raises(HubUnavailableError) as info:
        download_file("EleutherAI/gpt-neox-20b", "tokenizer.json", "tokenizer")
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set, so only the Hugging Face cache is read" in message
    assert "Or set HF_HUB_OFFLINE" not in message and ".." not in message and "\n" not in message
