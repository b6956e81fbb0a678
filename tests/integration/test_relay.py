"""The relay's thread pool over real loopback TCP: what bursts of connections leave behind.

Each relay thread splices through a pipe of its own; a thread that exits must take its pipe with it, and
a burst must not leave more idle threads (and pipes) than the pool keeps. The pipe fds are counted in
/proc/self/fd, so these run the relay in this process, on a pool of their own with a short idle time.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import threading
import time
import weakref
from typing import Iterator

import pytest

from boxpark import relay

pytestmark = pytest.mark.integration

DEADLINE = 60.0


def pipe_fds() -> int:
    """How many of this process's fds are pipes."""
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith("pipe:"):
                count += 1
        except OSError:  # the listing's own fd, or one closed meanwhile
            pass
    return count


def relay_threads() -> int:
    """The threads of the pool in use (alive, busy or idle), counted by the pool and checked against the
    process's own tasks in /proc (the pool's threads are not `threading.Thread`s)."""
    return relay._POOL.threads


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def wait_until(condition, deadline: float = DEADLINE) -> bool:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def use_pool(monkeypatch: pytest.MonkeyPatch, **kwargs: float) -> relay._Pool:
    pool = relay._Pool(**kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(relay, "_POOL", pool)
    return pool


def tcp_pairs(n: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0), backlog=n) as listener:
        for _ in range(n):
            near = socket.create_connection(listener.getsockname())
            far, _ = listener.accept()
            yield near, far


def burst(n: int, *, reset_every: int = 0) -> None:
    """`n` connections at once through relays: client → relay → target, a message each way, then the
    client half-closes and the target closes (every `reset_every`-th target resets instead)."""
    finished = threading.Semaphore(0)
    clients, targets = [], []
    for i, ((client, relay_client), (relay_target, target)) in enumerate(zip(tcp_pairs(n), tcp_pairs(n))):
        relay.Relay(relay_client, relay_target, b"first ", finished.release).start()
        clients.append(client)
        targets.append(target)
    for i, (client, target) in enumerate(zip(clients, targets)):
        client.sendall(b"ping %d" % i)
        expected = b"first ping %d" % i
        got = b""
        while len(got) < len(expected):
            got += target.recv(64)
        assert got == expected
        target.sendall(b"pong %d" % i)
        assert client.recv(64) == b"pong %d" % i
    for i, (client, target) in enumerate(zip(clients, targets)):
        client.shutdown(socket.SHUT_WR)
        if reset_every and i % reset_every == 0:
            target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            assert target.recv(64) == b""  # the half-close went through
        target.close()
        try:
            assert client.recv(64) == b""
        except ConnectionResetError:
            assert reset_every
        client.close()
    for _ in range(n):
        assert finished.acquire(timeout=DEADLINE), "a relay did not finish"


def test_idle_threads_close_their_pipes_when_they_exit(monkeypatch) -> None:
    use_pool(monkeypatch, idle_seconds=0.5)
    before_pipes, before_threads, before_tasks = pipe_fds(), relay_threads(), tasks()
    burst(100)
    burst(100, reset_every=3)  # some end on an error path: the relay's failing direction
    assert wait_until(lambda: relay_threads() <= before_threads), "idle relay threads did not exit"
    assert wait_until(lambda: tasks() <= before_tasks), f"{tasks() - before_tasks} threads left in /proc"
    assert wait_until(lambda: pipe_fds() <= before_pipes), \
        f"{pipe_fds() - before_pipes} pipe fds left after every relay thread exited"


def test_a_burst_leaves_at_most_max_idle_threads_and_their_pipes(monkeypatch) -> None:
    use_pool(monkeypatch, idle_seconds=3600, max_idle=4)
    before_pipes, before_threads = pipe_fds(), relay_threads()
    burst(100)
    assert wait_until(lambda: relay_threads() <= before_threads + 4), \
        f"{relay_threads() - before_threads} relay threads kept after the burst (at most 4)"
    assert wait_until(lambda: pipe_fds() <= before_pipes + 2 * 4), \
        f"{pipe_fds() - before_pipes} pipe fds kept after the burst (at most 8)"
    burst(20)  # the kept threads still work


def test_a_trickle_of_connections_lets_the_rest_of_a_bursts_threads_exit(monkeypatch) -> None:
    use_pool(monkeypatch, idle_seconds=2.0, max_idle=16)
    before_pipes, before_threads = pipe_fds(), relay_threads()
    burst(40)
    end = time.monotonic() + DEADLINE
    while relay_threads() > before_threads + 4 and time.monotonic() < end:
        burst(1)  # a connection every 0.1 s: if any idle thread took it, each would be busy every 0.8 s
        time.sleep(0.1)
    assert relay_threads() <= before_threads + 4, \
        f"{relay_threads() - before_threads} relay threads kept under a trickle of connections"
    assert wait_until(lambda: pipe_fds() <= before_pipes + 2 * 4)


def test_a_finished_relay_is_freed_without_a_cyclic_collection(monkeypatch) -> None:
    """Like the Guest Proxy's, this relay's `done` closes over the relay (to forget it): once both directions
    are done nothing may keep it (and its sockets) alive until the next full collection."""
    use_pool(monkeypatch, idle_seconds=0.5)
    finished = threading.Event()
    (client, relay_client), (relay_target, target) = next(tcp_pairs(1)), next(tcp_pairs(1))
    kept: set[relay.Relay] = set()

    def joined_relay() -> relay.Relay:  # as the proxy's: `done` forgets the relay it closes over
        joined = relay.Relay(relay_client, relay_target, b"", lambda: (kept.discard(joined), finished.set()))
        kept.add(joined)
        return joined

    joined = joined_relay()
    ref = weakref.ref(joined)
    gc.disable()  # a collection would hide the cycle
    try:
        joined.start()
        del joined, relay_client, relay_target
        client.close()
        target.close()
        assert finished.wait(DEADLINE), "the relay did not finish"
        assert wait_until(lambda: ref() is None), "the finished relay is held by a reference cycle"
    finally:
        gc.enable()
