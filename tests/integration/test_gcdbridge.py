"""The foreign-thread → asyncio bridge of the vz backend, with real threads standing in for GCD's.

Each race test runs many rounds: completions from many threads at once, double calls, cancellation before
the callback, a closed loop, accepted socketpairs delivered in order and usable, late deliveries closed.
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import threading
import time
import weakref

import pytest

from boxpark.host.gcdbridge import Completion, Inbox, KeptSocket

pytestmark = pytest.mark.integration

ROUNDS = 20


def run_threads(targets: list) -> None:
    barrier = threading.Barrier(len(targets))

    def wrap(fn):  # type: ignore[no-untyped-def]
        def go() -> None:
            barrier.wait()
            fn()
        return go

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_many_concurrent_completions(round_: int) -> None:
    async def main() -> None:
        completions = [Completion[int]() for _ in range(400)]
        errors = {i for i in range(400) if i % 7 == 0}
        chunks = [list(range(k, 400, 16)) for k in range(16)]

        def worker(indices: list[int]) -> None:
            for i in indices:
                if random.random() < 0.1:
                    time.sleep(0.0005)
                if i in errors:
                    completions[i](None, OSError(f"refused {i}"))
                else:
                    completions[i](i * 10)

        thread = threading.Thread(target=run_threads, args=([lambda c=c: worker(c) for c in chunks],))
        thread.start()
        results = await asyncio.gather(*(c.future for c in completions), return_exceptions=True)
        thread.join()
        for i, result in enumerate(results):
            if i in errors:
                assert isinstance(result, OSError) and str(result) == f"refused {i}"
            else:
                assert result == i * 10

    asyncio.run(main())


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_only_the_first_call_counts(round_: int) -> None:
    async def main() -> None:
        discarded: list[str] = []
        lock = threading.Lock()

        def discard(item: str) -> None:
            with lock:
                discarded.append(item)

        completions = [Completion[str](discard=discard) for _ in range(100)]
        counted: list[bool] = []

        def caller(name: str) -> None:
            for c in completions:
                counted.append(c(f"{name}"))

        await asyncio.to_thread(run_threads, [lambda: caller("a"), lambda: caller("b")])
        values = [await c for c in completions]
        assert counted.count(True) == 100 and counted.count(False) == 100
        assert all(v in ("a", "b") for v in values)
        assert len(discarded) == 100  # the loser of each race, never lost silently
        assert sorted(values + discarded) == sorted(["a", "b"] * 100)

    asyncio.run(main())


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_late_result_after_cancellation_is_discarded(round_: int) -> None:
    async def main() -> None:
        closed: list[socket.socket] = []
        pairs = [socket.socketpair() for _ in range(50)]
        completions = [Completion[socket.socket](discard=lambda s: (s.close(), closed.append(s))) for _ in pairs]
        waiters = [asyncio.ensure_future(c.future) for c in completions]
        await asyncio.sleep(0)
        for i, w in enumerate(waiters):
            if i % 2:
                w.cancel()  # the dial was abandoned (a timeout) before the framework answered

        def answer() -> None:
            for c, (a, _) in zip(completions, pairs):
                c(a)

        await asyncio.to_thread(answer)
        await asyncio.sleep(0.05)
        for i, (w, (a, b)) in enumerate(zip(waiters, pairs)):
            if i % 2:
                assert w.cancelled() and a in closed and a.fileno() == -1
            else:
                assert w.result() is a and a.fileno() >= 0
                a.close()
            b.close()
        assert len(closed) == 25

    asyncio.run(main())


def test_closed_loop_discards_without_raising_in_the_foreign_thread() -> None:
    loop = asyncio.new_event_loop()
    discarded: list[object] = []
    completion = Completion[object](loop, discard=discarded.append)
    inbox = Inbox[object](loop, discard=discarded.append)
    loop.close()
    raised: list[BaseException] = []

    def late() -> None:
        try:
            completion("conn")
            inbox.deliver("accepted")
        except BaseException as exc:  # pragma: no cover - the failure this test is about
            raised.append(exc)

    t = threading.Thread(target=late)
    t.start()
    t.join()
    assert raised == [] and discarded == ["conn", "accepted"]


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_accepted_socketpairs_arrive_in_order_and_work(round_: int) -> None:
    async def main() -> None:
        inbox = Inbox[tuple[int, int, socket.socket]]()
        peers: dict[tuple[int, int], socket.socket] = {}
        lock = threading.Lock()

        def acceptor(t: int) -> None:
            for i in range(100):
                ours, theirs = socket.socketpair()
                with lock:
                    peers[(t, i)] = theirs
                theirs.sendall(f"{t}:{i}".encode())
                assert inbox.deliver((t, i, ours))

        await asyncio.to_thread(run_threads, [lambda t=t: acceptor(t) for t in range(6)])
        last = {t: -1 for t in range(6)}
        for _ in range(600):
            t, i, sock = await asyncio.wait_for(inbox.get(), 60)
            assert i == last[t] + 1, "one thread's deliveries arrive in the order it made them"
            last[t] = i
            reader, writer = await asyncio.open_connection(sock=sock)
            assert await reader.readexactly(len(f"{t}:{i}")) == f"{t}:{i}".encode()
            writer.write(b"ok")
            await writer.drain()
            assert peers[(t, i)].recv(2) == b"ok"
            writer.close()
            peers[(t, i)].close()
        assert inbox.delivered == 600

    asyncio.run(main())


def test_inbox_handler_and_late_deliveries() -> None:
    async def main() -> None:
        seen: list[int] = []
        closed: list[socket.socket] = []
        inbox = Inbox[int](handler=seen.append)
        await asyncio.to_thread(lambda: [inbox.deliver(i) for i in range(1000)])
        await asyncio.sleep(0.05)
        assert seen == list(range(1000))

        socks = Inbox[socket.socket](discard=lambda s: (s.close(), closed.append(s)))
        a, b = socket.socketpair()
        socks.deliver(a)
        await asyncio.sleep(0.01)
        socks.close()  # queued and late items are closed, not leaked
        c, d = socket.socketpair()
        assert not await asyncio.to_thread(socks.deliver, c)
        await asyncio.sleep(0.01)
        assert closed == [a, c] and a.fileno() == -1 and c.fileno() == -1
        with pytest.raises(EOFError):
            await socks.get()
        b.close()
        d.close()

    asyncio.run(main())


def test_kept_socket_holds_its_owner_until_closed() -> None:
    class Connection:  # stands in for VZVirtioSocketConnection: owns the original fd
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

    released: list[object] = []
    ours, theirs = socket.socketpair()
    owner = Connection(ours)
    def release(o: object) -> None:
        released.append(o)
        o.sock.close()  # type: ignore[attr-defined]

    kept = KeptSocket.dup(ours.fileno(), owner, release)
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is not None and kept.alive  # the original fd stays open while our copy is in use
    kept.sock.sendall(b"ping")
    assert theirs.recv(4) == b"ping"
    run_threads([kept.close for _ in range(8)])  # closed from several threads: released exactly once
    assert len(released) == 1 and not kept.alive and kept.sock.fileno() == -1
    released.clear()
    gc.collect()
    assert ref() is None
    assert theirs.recv(1) == b""  # both copies closed: the peer sees the end
    theirs.close()
