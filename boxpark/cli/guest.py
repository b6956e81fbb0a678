"""`boxpark guest serve` and `boxpark guest call`: the Guest API server, and a client for any of its calls.

`guest serve` runs inside the guest, whose image carries no host code: this module imports nothing of the
package at its top, `serve` loads only the guest server and the transport, and only `call` (a host-side
debugging tool) loads the host's client. asyncio too loads only when a command runs (it costs more than
parsing the whole command line).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from typing import Any

from ..errors import UsageError


def add_arguments(name: str, guest: argparse.ArgumentParser) -> None:
    from . import EPILOG

    guest.description = "The Guest API server and a client for any of its calls."
    guest_commands = guest.add_subparsers(dest="guest_command", metavar="SUBCOMMAND", required=True)
    serve = guest_commands.add_parser(
        "serve", help="run the Guest API server in the foreground", epilog=EPILOG,
        description="Run the Guest API server in the foreground until SIGTERM or Ctrl-C. Machine-wide calls "
                    "(swap, clock, hostname, reboot) are refused unless it runs as PID 1.")
    serve.add_argument("--listen", action="append", required=True, metavar="ADDRESS",
                       help="address to serve on (repeatable)")
    serve.add_argument("--events", metavar="ADDRESS", help="also dial the host's event stream at ADDRESS")
    serve.add_argument("--secret-file", metavar="FILE", help="the machine secret (required for tcp)")
    serve.add_argument("--machine-wide", action="store_true",
                       help="allow machine-wide calls even when not PID 1 (only inside a VM!)")
    serve.set_defaults(func=_guest_serve)

    call = guest_commands.add_parser(
        "call", help="make one Guest API call and print the reply as JSON", epilog=EPILOG,
        description="Make any Guest API call and print the reply as one JSON line. Streaming calls (attach, "
                    "events, notify_listen, launch with connect) print one line per frame until the stream "
                    "ends or Ctrl-C; connect bridges stdin/stdout to the guest socket; exec with "
                    "interactive forwards stdin. Byte parameters (stdin, data) may be given as plain text.",
    )
    call.add_argument("address", help="the guest's API address")
    call.add_argument("method", help="the call, e.g. info, exec, launch, attach, read_file, connect")
    call.add_argument("--json", metavar="PARAMS", help='the parameters as a JSON object, e.g. \'{"argv": ["uname", "-a"]}\'')
    call.add_argument("--secret-file", metavar="FILE", help="the machine secret (required for tcp)")
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the connection")
    call.set_defaults(func=_guest_call)


# --------------------------------------------------------------------------------------- serve


def _guest_serve(args: argparse.Namespace) -> int:
    import asyncio

    from ..guest.server import GuestServer, run_forever
    from ..transport import parse_address, read_secret

    secret = read_secret(args.secret_file) if args.secret_file else None
    listen = [(parse_address(text), secret) for text in args.listen]
    for address, _ in listen:
        if address.needs_secret and secret is None:
            raise UsageError(f"listening on {address} needs --secret-file (tcp is reachable by other users)")
    events_to = parse_address(args.events) if args.events else None
    if events_to is not None and events_to.needs_secret and secret is None:
        raise UsageError(f"the event stream {events_to} needs --secret-file")
    server = GuestServer(machine_wide=True if args.machine_wide else None)
    asyncio.run(run_forever(listen, events_to=events_to, events_secret=secret, server=server))
    return 0


# ---------------------------------------------------------------------------------------- call


def _jsonable(value: Any) -> Any:
    """Builtins for JSON: bytes as text where they are UTF-8, else {"base64": ...}."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _print_message(message: Any) -> None:
    import msgspec

    print(json.dumps(_jsonable(msgspec.to_builtins(message, builtin_types=(bytes,)))), flush=True)


def _request_from(method: str, params: dict[str, Any]) -> Any:
    import msgspec

    from .. import protocol

    tags = {cls.__struct_config__.tag: cls for cls in protocol.REQUEST_TYPES}
    cls = tags.get(method)
    if cls is None:
        raise UsageError(f"unknown method {method!r}; one of: {', '.join(sorted(tags))}")
    fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
    for key, value in list(params.items()):
        if key not in fields:
            raise UsageError(f"{method} takes no parameter {key!r}; it takes: {', '.join(fields) or 'none'}")
        if fields[key] is bytes and isinstance(value, str):
            params[key] = value.encode()  # plain text is friendlier on a command line than base64
    try:
        return msgspec.convert(params, cls)
    except msgspec.ValidationError as exc:
        raise UsageError(f"bad parameters for {method}: {exc}") from None


def _guest_call(args: argparse.Namespace) -> int:
    import asyncio

    from .. import protocol
    from ..host.client import GuestClient
    from ..transport import read_secret

    try:
        params = json.loads(args.json) if args.json else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--json is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise UsageError("--json must be a JSON object of the call's parameters")
    request = _request_from(args.method, params)
    secret = read_secret(args.secret_file) if args.secret_file else None

    async def call() -> int:
        client = await GuestClient.open(args.address, secret=secret, timeout=args.timeout)
        async with client:
            spec = protocol.call_spec(request)
            if spec.raw:
                return await _bridge_stdio(await client.open_raw(request))
            if spec.kind is protocol.CallKind.UPGRADE:
                return await _interactive(client, request)
            if spec.kind is protocol.CallKind.STREAM:
                async with await client.stream(request) as stream:
                    _print_message(stream.first)
                    async for frame in stream:
                        _print_message(frame)
                return 0
            reply = await client.call(request)
            _print_message(reply)
            return 0

    return asyncio.run(call())


async def _interactive(client: Any, request: Any) -> int:
    """Interactive exec from `guest call`: local stdin goes in, output frames come out as JSON lines."""
    import asyncio

    from .terminal import pump_stdin

    process = await client.exec_interactive(request.argv, tty=request.tty, rows=request.rows, cols=request.cols,
                                            env=request.env, cwd=request.cwd, name=request.name)

    async def send(data: bytes) -> None:
        process.write(data)
        await process.drain()

    async def pump() -> None:
        await pump_stdin(send)
        process.close_stdin()

    pumping = asyncio.ensure_future(pump())
    async for chunk in process.output():
        _print_message(chunk)
    pumping.cancel()
    if process.exit is not None:
        _print_message(process.exit)
        return process.exit.code if process.exit.code is not None else 128 + (process.exit.signal or 0)
    return 1


async def _bridge_stdio(sock: Any) -> int:
    """Raw bytes between this terminal's stdin/stdout and a guest socket (like socat)."""
    import asyncio

    from .terminal import pump_stdin

    loop = asyncio.get_running_loop()
    sock.setblocking(False)

    async def send(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    async def upstream() -> None:
        await pump_stdin(send)
        sock.shutdown(1)  # half-close: the guest side sees EOF and may still answer

    sending = asyncio.ensure_future(upstream())
    while data := await loop.sock_recv(sock, 65536):
        os.write(1, data)
    sending.cancel()
    sock.close()
    return 0
