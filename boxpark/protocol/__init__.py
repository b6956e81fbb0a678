"""The Boxpark Guest API: the whole host↔guest contract, sans-IO — no module here opens a socket.

- `messages`: every message as a `msgspec.Struct`, the error codes and the limits;
- `calls`: what each call is (unary, stream, upgrade) and which messages answer it, the `CALLS` table;
- `codec`: frames (a 4-byte big-endian length, then a msgpack body) to messages and back;
- `handshake`: the handshake and the client side of an upgrade call as state machines that `transport`
  drives.
Every public name is importable from `boxpark.protocol` itself.

A connection (see DESIGN.md §3):
1. the client sends `Hello`; on tcp the server answers `Challenge` and the client sends `Proof`; the
   server answers `Welcome` (or `Error`, then closes);
2. then either unary calls (request → reply or `Error`), one after the other; or one streaming call
   (`Attach`, `NotifyListen`, `Events`, `Launch` with connect) whose frames follow the reply until the
   stream ends; or one upgrade call (`Connect`, interactive `Exec`) that owns the connection from then on.

The guest also dials the host's event stream: there the guest is the client, sends `Hello`, and after
`Welcome` the host sends `Resume` with the last event sequence number it has seen; the guest then sends
`EventFrame`s.
"""

from .calls import *  # noqa: F401,F403
from .codec import *  # noqa: F401,F403
from .handshake import *  # noqa: F401,F403
from .messages import *  # noqa: F401,F403
