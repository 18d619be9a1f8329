"""The reachability check of the Hugging Face Hub, through a proxy."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from samba.hub import HubUnavailableError, hub_reachable, require_hub


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
