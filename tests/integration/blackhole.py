"""A TCP endpoint that accepts MTProto connections and never answers (test helper).

It stands for a stuck DC or a black-holing proxy: the real Telethon client, pointed at it with
``TELEGRAM_DC``, connects, sends its handshake and waits. Each accepted connection is recorded
with the time it arrived, so a test can both see that the client came here and time how long
the client waited after that.
"""

from __future__ import annotations

import socket
import threading
import time


class BlackHole:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.arrivals: list[float] = []  # time.monotonic() of each accepted connection
        self.received = 0  # bytes read (and never answered)
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="blackhole", daemon=True)

    def __enter__(self) -> BlackHole:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._conns:
            conn.close()
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                self._drain()
                continue
            self.arrivals.append(time.monotonic())
            conn.setblocking(False)
            self._conns.append(conn)
            self._drain()

    def _drain(self) -> None:
        for conn in self._conns:
            try:
                while data := conn.recv(65536):
                    self.received += len(data)
            except (BlockingIOError, OSError):
                pass
