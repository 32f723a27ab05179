"""A real ``lightning-distill serve`` process on loopback for the tests: started on a free port, waited for, and
stopped with every process it started (its process group), whatever the test did."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    """A port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(teacher: str, log: Path, *args: str, port: int | None = None, api_key: str | None = None,
          timeout: float = 90.0) -> Server:
    """Start ``lightning-distill serve --teacher TEACHER`` (float32, one torch thread) and wait until it answers."""
    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LIGHTNING_DISTILL_API_KEY", None)
    command = [sys.executable, "-m", "lightning_distill", "serve", "--teacher", teacher, "--port", str(port),
               "--dtype", "float32", *args, *(["--api-key", api_key] if api_key else [])]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{server.output()[-3000:]}")
        request = urllib.request.Request(f"{server.url}/health",
                                         headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=2) as answer:
            if answer.status == 200:
                return server
        time.sleep(0.25)
    stop(server)
    raise RuntimeError(f"the server did not answer within {timeout} s:\n{server.output()[-3000:]}")


def stop(server: Server) -> None:
    """Stop the server and every process it started (SIGTERM to its group, then SIGKILL what is left)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=5)


@contextlib.contextmanager
def running(teacher: str, log: Path, *args: str, **kwargs) -> Iterator[Server]:
    server = start(teacher, log, *args, **kwargs)
    try:
        yield server
    finally:
        stop(server)


def get(url: str, api_key: str | None = None) -> tuple[int, bytes]:
    """GET ``url``: its status and body (also for 4xx/5xx)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Proxy:
    """A TCP forwarder on loopback in front of a server, which a test can take down (the server seems killed: the
    port refuses connections, open ones are cut) and bring back on the same port (the server restarted)."""

    def __init__(self, target: str) -> None:
        host_port = target.removeprefix("http://")
        self.target = (host_port.split(":")[0], int(host_port.split(":")[1]))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.sockets = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
