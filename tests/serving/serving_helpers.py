"""Helpers for the serving tests: a real uvicorn server on a loopback port, and reading what it serves."""

import socket
import threading
import time
from contextlib import contextmanager

import httpx

from spikelm.serving.app import create_app
from spikelm.serving.server import DrainingServer, uvicorn_config
from spikelm.serving.settings import ServeSettings


@contextmanager
def running_server(model_dir, **settings):
    """Start the real app under uvicorn in a thread, on a port the OS picked; yields its base URL."""
    with server_handle(model_dir, **settings) as handle:
        yield handle.base


class ServerHandle:
    def __init__(self, base, server, thread, app):
        self.base, self.server, self.thread, self.app = base, server, thread, app

    def shut_down(self):
        """What Ctrl-C does: uvicorn's graceful shutdown (returns at once; the server drains in its thread)."""
        self.server.should_exit = True


@contextmanager
def server_handle(model_dir, **settings):
    """Like running_server, yielding a ServerHandle (base URL, the uvicorn server, its thread, the app)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings.setdefault("api_key", None)
    settings.setdefault("threads", 1)  # the test process shares two cores
    settings.setdefault("shutdown_timeout_s", 0.5)
    serve_settings = ServeSettings(model=str(model_dir), port=port, **settings)
    app = create_app(serve_settings)
    server = DrainingServer(uvicorn_config(app, serve_settings, log_level="warning"), app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.1)
    try:
        yield ServerHandle(base, server, thread, app)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def metric(base, name) -> float:
    """One unlabelled sample from /metrics."""
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def stream_completion(base, body, headers=None, timeout=120):
    """POST a streaming request; returns (the events' JSON objects, whether [DONE] came)."""
    import json

    events, done = [], False
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[len("data: "):]))
    return events, done
