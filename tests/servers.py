"""Small servers that tests run on the host's loopback: one accept loop, stopped and joined on exit."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def serving(handle: Callable[[socket.socket], None], *, host: str = "127.0.0.1",
            threaded: bool = False) -> Iterator[int]:
    """Accept TCP connections on `host` and give each to `handle` (which closes it), in the accepting
    thread or one thread each; yields the port. Leaving the block stops accepting and joins the loop."""
    listener = socket.create_server((host, 0), backlog=512)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the block was left
                return
            if threaded:
                threading.Thread(target=handle, args=(conn,), daemon=True).start()
            else:
                with contextlib.suppress(OSError):
                    handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
