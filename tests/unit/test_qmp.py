"""The QMP client keeps a bounded number of the events it reads between replies (a long-lived machine's
balloon moves send one each)."""

from __future__ import annotations

import asyncio
import json
import socket

from boxpark.host.backends.qmp import EVENTS_KEPT, Qmp


def test_events_read_between_replies_are_bounded_to_the_newest() -> None:
    async def main() -> Qmp:
        ours, qemus = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        qmp = Qmp(reader, writer)
        events = [{"event": "BALLOON_CHANGE", "data": {"actual": n}} for n in range(5 * EVENTS_KEPT)]
        qemus.sendall(b"".join(json.dumps(e).encode() + b"\n" for e in events) + b'{"return": {}}\n')
        assert await qmp.execute("query-balloon") == {}
        assert json.loads(qemus.recv(4096)) == {"execute": "query-balloon"}
        writer.close()
        qemus.close()
        return qmp

    qmp = asyncio.run(main())
    assert len(qmp.events) == EVENTS_KEPT
    assert [e["data"]["actual"] for e in qmp.events] == list(range(4 * EVENTS_KEPT, 5 * EVENTS_KEPT))
