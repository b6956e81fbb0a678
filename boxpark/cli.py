"""The `boxpark` command: parses arguments and hands each subcommand to its area.

Imports are lazy per subcommand, so `boxpark guest serve` (which runs in the guest) never loads host code
and the host commands never load guest code. Failures print one sentence a person can act on and exit
non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
from typing import Any, Callable, NoReturn

from . import __version__

EPILOG = """addresses: unix:PATH, tcp:HOST:PORT (needs --secret-file), vsock:CID:PORT"""


class UsageError(Exception):
    """The command line or a file it names is wrong; the message says what to change."""


def die(message: str, hint: str = "", code: int = 1) -> NoReturn:
    print(f"boxpark: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    raise SystemExit(code)


# --------------------------------------------------------------------------------------- guest


def _guest_serve(args: argparse.Namespace) -> int:
    from .guest.server import GuestServer, run_forever
    from .transport import parse_address, read_secret

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

    from . import protocol

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
    from . import protocol
    from .host.client import GuestClient
    from .transport import read_secret

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
            if isinstance(request, protocol.Connect):
                return await _bridge_stdio(await client.connect(path=request.path, port=request.port,
                                                                host=request.host, timeout=request.timeout))
            if isinstance(request, protocol.Exec) and request.interactive:
                return await _interactive(client, request)
            streaming = (isinstance(request, (protocol.Attach, protocol.NotifyListen, protocol.Events))
                         or (isinstance(request, protocol.Launch) and request.connect))
            if streaming:
                channel, first = await client._owning_call(request, protocol.Ok, protocol.Launched)
                _print_message(first)
                from .host.client import Stream

                async for frame in Stream(channel, first, (protocol.Exit, protocol.EndOfStream)):
                    _print_message(frame)
                return 0
            reply = await client.call(request, *(t for t in protocol.MESSAGE_TYPES if t is not protocol.Error))
            _print_message(reply)
            return 0

    return asyncio.run(call())


async def _interactive(client: Any, request: Any) -> int:
    """Interactive exec from `guest call`: local stdin goes in, output frames come out as JSON lines."""
    process = await client.exec_interactive(request.argv, tty=request.tty, rows=request.rows, cols=request.cols,
                                            env=request.env, cwd=request.cwd, name=request.name)
    loop = asyncio.get_running_loop()

    async def pump() -> None:
        while data := await loop.run_in_executor(None, os.read, 0, 65536):
            process.write(data)
            await process.drain()
        process.close_stdin()

    pumping = loop.create_task(pump())
    async for chunk in process.output():
        _print_message(chunk)
    pumping.cancel()
    if process.exit is not None:
        _print_message(process.exit)
        return process.exit.code if process.exit.code is not None else 128 + (process.exit.signal or 0)
    return 1


async def _bridge_stdio(sock: Any) -> int:
    """Raw bytes between this terminal's stdin/stdout and a guest socket (like socat)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)

    async def upstream() -> None:
        while data := await loop.run_in_executor(None, os.read, 0, 65536):
            await loop.sock_sendall(sock, data)
        sock.shutdown(1)  # half-close: the guest side sees EOF and may still answer

    sending = loop.create_task(upstream())
    while data := await loop.sock_recv(sock, 65536):
        os.write(1, data)
    sending.cancel()
    sock.close()
    return 0


def _image_build(args: argparse.Namespace) -> int:
    from .image import build

    return build.run(args)


def _image_export(args: argparse.Namespace) -> int:
    from .image import bundle

    return bundle.run_export(args)


def _image_import(args: argparse.Namespace) -> int:
    from .image import bundle

    return bundle.run_import(args)


def _vz_sign(args: argparse.Namespace) -> int:
    from .host import vzsign

    return vzsign.run(args)


def _diagnose(args: argparse.Namespace) -> int:
    from .host import diagnose

    return diagnose.run(args)


def _boot(args: argparse.Namespace) -> int:
    from .host import boot

    return boot.run(args)


# ------------------------------------------------------------------------------------ parser


def _add_image_build(parser: argparse.ArgumentParser) -> None:
    try:
        from .image import build
    except ImportError:
        return
    adder: Callable[[argparse.ArgumentParser], None] | None = getattr(build, "add_arguments", None)
    if adder is not None:
        adder(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxpark", description="Run Docker in a minimal Linux guest VM.",
                                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"boxpark {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    guest = commands.add_parser("guest", help="the Guest API: serve it, or make calls to it (debugging)",
                                description="The Guest API server and a client for any of its calls.")
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

    image = commands.add_parser("image", help="build the guest image",
                                description="Build and manage guest images.")
    image_commands = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    image_build = image_commands.add_parser("build", help="build the guest image (cached by its inputs)",
                                            description="Build the guest image: kernel, initramfs, squashfs "
                                                        "root and manifest, from Debian packages.")
    _add_image_build(image_build)
    image_build.set_defaults(func=_image_build)
    image_export = image_commands.add_parser(
        "export", help="write an image as one bundle file (for a host that cannot build it)",
        description="Write the image (kernel, initramfs, root, manifest) as a bundle: a tar with the sha256 "
                    "of each file.")
    image_import = image_commands.add_parser(
        "import", help="verify and install an image bundle (a file or an http(s)/file URL)",
        description="Verify every file of a bundle against its sha256 and install the image atomically.")
    try:
        from .image import bundle
    except ImportError:
        pass
    else:
        bundle.add_export_arguments(image_export)
        bundle.add_import_arguments(image_import)
    image_export.set_defaults(func=_image_export)
    image_import.set_defaults(func=_image_import)

    vz = commands.add_parser("vz", help="macOS: Virtualization.framework set-up",
                             description="Set up the vz backend (macOS, Virtualization.framework).")
    vz_commands = vz.add_subparsers(dest="vz_command", metavar="SUBCOMMAND", required=True)
    vz_sign = vz_commands.add_parser(
        "sign", help="make the ad-hoc-signed Python launcher the agent needs for VZ (macOS)",
        description="Copy this Python's interpreter, sign the copy ad hoc with the "
                    "com.apple.security.virtualization entitlement, and record it: `up` with backend vz starts "
                    "the machine agent with it. Prints the launcher's path.")
    from .host.vzsign import add_arguments as add_vz_sign_arguments  # stdlib only: cheap

    add_vz_sign_arguments(vz_sign)
    vz_sign.set_defaults(func=_vz_sign)

    from .host.boot import add_arguments as add_boot_arguments  # cheap: the backends load when it runs

    boot = commands.add_parser("boot", help="boot a guest in the foreground (development)",
                               description="Boot the guest image on a backend, print its boot timeline and "
                                           "API address, and stop it cleanly on Ctrl-C or SIGTERM.")
    add_boot_arguments(boot)
    boot.set_defaults(func=_boot)

    from .host.commands import add_commands

    add_commands(commands, EPILOG)

    from .host.diagnose import DESCRIPTION, add_arguments as add_diagnose_arguments  # stdlib only: cheap

    diagnose = commands.add_parser("diagnose", help="write a diagnostics archive for a bug report (secrets masked)",
                                   description=DESCRIPTION)
    add_diagnose_arguments(diagnose)
    diagnose.set_defaults(func=_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    from .host.commands import CommandFailed
    from .transport import RemoteError, TransportError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CommandFailed as exc:
        if args.debug:
            raise
        die(str(exc), exc.hint, exc.code)
    except (UsageError, TransportError) as exc:
        if args.debug:
            raise
        die(str(exc), code=2 if isinstance(exc, UsageError) else 1)
    except RemoteError as exc:
        if args.debug:
            raise
        die(f"the guest refused the call ({exc.code.name}): {exc.message}")


if __name__ == "__main__":
    sys.exit(main())
