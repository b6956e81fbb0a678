"""Results from foreign threads into asyncio: what the vz backend's GCD callbacks hand to the event loop.

Virtualization.framework answers on its dispatch queue's thread: completion handlers (start, stop,
connectToPort) and the socket listener's delegate. None of them may touch the loop directly. Each goes
through `call_soon_threadsafe`, and each case that can go wrong has one answer here:

- `Completion`: a one-shot callable handed to a foreign API with an awaitable `future`. The first call
  settles the future; later calls are ignored (a framework that calls twice cannot set it twice). When
  the awaiting side was cancelled, or the loop is closed, the result is handed to `discard` (a connection
  that arrives after its dial was abandoned is closed, not leaked) and the foreign thread never sees an
  exception.
- `Inbox`: many deliveries (accepted connections) into the loop in the order each thread made them; after
  `close()` or the loop's end each late item goes to `discard`.
- `KeptSocket`: a socket whose file descriptor was duplicated from a framework object that owns the
  original (VZVirtioSocketConnection): the object is kept referenced until the socket closes, then released.

No PyObjC here: tests run real threads in place of GCD's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import threading
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger("boxpark.host.gcdbridge")

T = TypeVar("T")


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> bool:
    """Schedule `fn(*args)` on `loop` from any thread; False when the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # "Event loop is closed"
        return False
    return True


def _discard_quietly(discard: Callable[[Any], None] | None, item: Any) -> None:
    if discard is None:
        return
    try:
        discard(item)
    except Exception:  # a foreign thread must never see our clean-up fail
        log.exception("discarding a late result")


class Completion(Generic[T]):
    """A one-shot result from a foreign thread: call it with `(result)` or `(None, error)`; await `future`."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None,
                 discard: Callable[[T], None] | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.future: asyncio.Future[T] = self.loop.create_future()
        self.discard = discard  # for a result nobody will take (cancelled, loop closed, a second call)
        self._lock = threading.Lock()
        self._called = False

    def __call__(self, result: T | None = None, error: BaseException | None = None) -> bool:
        """From any thread. True when this call is the one that counts (it may still be discarded)."""
        with self._lock:
            first = not self._called
            self._called = True
        if not first:
            if result is not None:
                _discard_quietly(self.discard, result)
            return False
        if not _post(self.loop, self._settle, result, error):
            if result is not None:
                _discard_quietly(self.discard, result)
        return True

    def _settle(self, result: T | None, error: BaseException | None) -> None:
        if self.future.done():  # cancelled while the foreign side worked
            if result is not None:
                _discard_quietly(self.discard, result)
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)  # type: ignore[arg-type]

    def __await__(self) -> Any:
        return self.future.__await__()


class Inbox(Generic[T]):
    """Items delivered from foreign threads, taken on the loop in order: `await inbox.get()`.

    `handler`, when given, is called on the loop with each item instead of queueing it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *,
                 handler: Callable[[T], None] | None = None, discard: Callable[[T], None] | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.handler = handler
        self.discard = discard
        self.delivered = 0  # items that reached the loop
        self._items: collections.deque[T] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def deliver(self, item: T) -> bool:
        """From any thread. False (and `item` discarded) when the inbox or the loop is closed."""
        if self._closed or not _post(self.loop, self._arrive, item):
            _discard_quietly(self.discard, item)
            return False
        return True

    def _arrive(self, item: T) -> None:
        if self._closed:
            _discard_quietly(self.discard, item)
            return
        self.delivered += 1
        if self.handler is not None:
            try:
                self.handler(item)
            except Exception:
                log.exception("inbox handler")
                _discard_quietly(self.discard, item)
            return
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> T:
        """The next item; `EOFError` once the inbox is closed and empty."""
        while not self._items:
            if self._closed:
                raise EOFError("the inbox is closed")
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def close(self) -> None:
        """On the loop: take no more; what is queued and what arrives late goes to `discard`."""
        self._closed = True
        while self._items:
            _discard_quietly(self.discard, self._items.popleft())
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class KeptSocket:
    """A socket on a duplicated fd, and the object that owns the original, kept until the socket closes.

    `release(owner)` runs once, after the socket is closed (e.g. VZVirtioSocketConnection.close on the VM's
    queue). Thread-safe: relay threads and the loop may both close it.
    """

    def __init__(self, sock: socket.socket, owner: object, release: Callable[[object], None] | None = None) -> None:
        self.sock = sock
        self._owner: object | None = owner
        self._release = release
        self._lock = threading.Lock()

    @classmethod
    def dup(cls, fd: int, owner: object, release: Callable[[object], None] | None = None) -> KeptSocket:
        """Duplicate `fd` (owned by `owner`), as a blocking socket ready for asyncio or a relay."""
        sock = socket.socket(fileno=socket.dup(fd))
        sock.setblocking(True)
        return cls(sock, owner, release)

    @property
    def alive(self) -> bool:
        return self._owner is not None

    def close(self) -> None:
        with self._lock:
            owner, self._owner = self._owner, None
        if owner is None:
            return
        self.sock.close()
        if self._release is not None:
            try:
                self._release(owner)
            except Exception:
                log.exception("releasing a connection")
