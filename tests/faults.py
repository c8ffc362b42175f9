"""A fault-injecting TCP proxy for tests: client -> proxy -> real server, with outages on demand.

Modes: ``pass`` forwards; ``refuse`` closes the listening socket (connect() is refused); ``reset`` accepts
and resets every connection (RST); ``stall`` accepts and forwards nothing either way; ``busy`` answers every
request with S3's throttling reply (HTTP 503 SlowDown). Entering a fault mode
resets the connections open at that moment, so a pooled keep-alive connection cannot bypass the outage.
``fault_on(pattern, mode, seconds, after=k)`` starts an outage when the k-th request whose first line
contains ``pattern`` arrives (that request is caught by it), lasting ``seconds`` (None: until ``set('pass')``).
"""
from __future__ import annotations

import socket
import struct
import threading
import time

LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
BUSY = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(SLOW_DOWN), SLOW_DOWN))


def _rst(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        sock.close()
    except OSError:
        pass


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1"):
        self.upstream, self.host = upstream, host
        self.mode = "pass"
        self.requests: list[str] = []  # first lines of the HTTP requests seen
        self.outages = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._trigger: tuple[str, str, float | None, int] | None = None
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self.url = f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ control

    def set(self, mode: str) -> None:
        with self._lock:
            old, self.mode = self.mode, mode
            if mode != "pass":
                self.outages += old == "pass"
                for c in list(self._conns):
                    _rst(c)
                self._conns.clear()
        if mode == "refuse" and self._listener:
            listener, self._listener = self._listener, None
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(), which holds it open
            listener.close()
        elif mode != "refuse" and self._listener is None:
            self._listen()

    def outage(self, mode: str, seconds: float | None) -> None:
        """Start an outage now; end it after ``seconds`` (None: it lasts until ``set('pass')``)."""
        self.set(mode)
        if seconds is not None:
            timer = threading.Timer(seconds, self.set, ("pass",))
            timer.daemon = True
            timer.start()

    def fault_on(self, pattern: str, mode: str, seconds: float | None, after: int = 1) -> None:
        self._trigger = (pattern, mode, seconds, after)

    def seen(self, pattern: str) -> int:
        return sum(pattern in r for r in self.requests)

    def close(self) -> None:
        self._trigger = None
        self.set("refuse")

    # ------------------------------------------------------------------ plumbing

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed (refuse)
            if self.mode == "reset":
                _rst(client)
                continue
            with self._lock:
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = None
        try:
            first = client.recv(65536)
            while first and self.mode == "stall" and client in self._conns:
                time.sleep(0.05)  # hold the request until the stall ends or the connection is reset
            triggered = first and self.mode == "pass" and self._check_trigger(first)
            if first and self.mode == "busy":
                client.sendall(BUSY)  # a HEAD's reply has no body: the client ignores the extra bytes
                client.close()
                return
            if not first or self.mode != "pass" or triggered:
                _rst(client)
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._conns.add(server)
            server.sendall(first)
            back = threading.Thread(target=self._pump, args=(server, client, False), daemon=True)
            back.start()
            self._pump(client, server, True)
        except OSError:
            pass
        finally:
            for s in (client, server):
                if s is not None:
                    with self._lock:
                        self._conns.discard(s)
                    _rst(s) if self.mode != "pass" else s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if from_client and self._check_trigger(data):
                    _rst(src)
                    _rst(dst)
                    return
                while self.mode == "stall" and src in self._conns:
                    time.sleep(0.05)
                if self.mode != "pass":
                    return
                dst.sendall(data)
        except OSError:
            pass

    @staticmethod
    def _is_request(data: bytes) -> bool:
        return data.split(b" ", 1)[0] in (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE")

    def _check_trigger(self, data: bytes) -> bool:
        """Record a request; True when it starts the armed outage (the caller then drops it)."""
        if not self._is_request(data):
            return False
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        with self._lock:
            self.requests.append(line)
            trig = self._trigger
            if not trig or trig[0] not in line or sum(trig[0] in r for r in self.requests) < trig[3]:
                return False
            self._trigger = None
        self.outage(trig[1], trig[2])
        return True
