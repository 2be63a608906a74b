"""A pausable TCP relay in front of the broker."""

from __future__ import annotations

import contextlib
import socket

from .broker import BROKER_HOST, BROKER_PORT


class Relay:
    """A TCP relay in front of the broker whose broker-to-client direction can be held, so a
    test can tell what waits for the broker's answer and what does not."""

    def __init__(self, target_port: int = BROKER_PORT) -> None:
        import threading

        self.target_port = target_port
        self._held = threading.Event()
        self._held_to_broker = threading.Event()
        self._sockets: list[socket.socket] = []
        self._cut: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, to_broker: bool = False) -> None:
        """Stop passing on what the broker sends (it queues up in the relay), and with
        `to_broker` what is sent to it too."""
        self._held.set()
        if to_broker:
            self._held_to_broker.set()

    def release(self) -> None:
        self._held.clear()
        self._held_to_broker.clear()

    def cut(self) -> None:
        """Drop the connections relayed so far, and what they hold: the broker never gets
        it, nor the proxy the broker's answers. New connections pass freely."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
            self._cut.update(sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self.release()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((BROKER_HOST, self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_broker: bool) -> None:
        pending = b""
        source.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = source.recv(65536)
                if not data:
                    break
                pending += data
            except TimeoutError:
                pass
            except OSError:
                break
            if source in self._cut or sink in self._cut:
                return  # (what it held is dropped)
            held = self._held if from_broker else self._held_to_broker
            if pending and not held.is_set():
                try:
                    sink.sendall(pending)
                except OSError:
                    break
                pending = b""
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
