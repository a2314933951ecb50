"""A TCP proxy in front of a test gunicorn that loses answers, for tests/test_client.py.

``LossyProxy`` listens on a port of its own and passes each request to the server on
``upstream`` (a port on 127.0.0.1). Told to ``lose_next_answer()``, it passes the next
request on, reads the server's whole answer (so the view has run and committed) and closes
the client's connection without sending a byte of it: the client sees a dropped connection,
as it would when a load balancer or a mobile network loses the answer. With ``then_down``,
it also stops passing requests on, as if the server were gone, until the test points it at
another server (``upstream = port``): the client's retries meet a restart. Gunicorn's sync
workers close each connection after one answer, so one request per connection is all a
proxy of this suite has to handle.
"""

from __future__ import annotations

import socket
import threading

#: Seconds: for the server's answer, and for the client to send its request.
TIMEOUT = 20


class LossyProxy:
    """A proxy on 127.0.0.1 that passes requests to ``upstream`` and can lose the answers."""

    def __init__(self, upstream: int) -> None:
        self.upstream: int | None = upstream
        self._lock = threading.Lock()
        self._lose = 0
        self._down_after_losing = False
        #: Set once an answer was lost; how many were, and how many requests met no server.
        self.lost = threading.Event()
        self.lost_answers = 0
        self.refused = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        # accept() in another thread does not notice close(): it polls for _closed instead.
        self._listener.settimeout(0.05)
        self._closed = threading.Event()
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lose_next_answer(self, *, then_down: bool = False) -> None:
        """Lose the next answer; with ``then_down``, pass nothing on afterwards."""
        with self._lock:
            self._lose += 1
            self._down_after_losing = then_down

    def close(self) -> None:
        self._closed.set()
        self._thread.join(TIMEOUT)
        self._listener.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client:
            client.settimeout(TIMEOUT)
            request = _read_request(client)
            with self._lock:
                upstream = self.upstream
                if upstream is None:
                    self.refused += 1
                    return  # closed unanswered: the server is gone
            try:
                answer = _exchange(upstream, request)
            except OSError:
                with self._lock:
                    self.refused += 1
                return
            with self._lock:
                lose = self._lose > 0
                if lose:
                    self._lose -= 1
                    self.lost_answers += 1
                    if self._down_after_losing:
                        self.upstream = None
            if lose:
                self.lost.set()
                return  # the view ran and committed; its answer goes nowhere
            client.sendall(answer)


def _read_request(client: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = client.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as upstream:
        upstream.sendall(request)
        answer = b""
        while chunk := upstream.recv(65536):
            answer += chunk
    return answer
