"""The mount guard: a dockerd authorization plugin that refuses a bind mount of a path the guest does not have.

Without it `docker run -v /tmp/x:/data`, with /tmp/x on the host but outside every share, makes an empty
/tmp/x in the guest and the container sees nothing. dockerd hands every API request, with its body, to
each plugin in `authorization-plugins` (POST /AuthZPlugin.AuthZReq on /run/docker/plugins/NAME.sock) and
refuses it with the plugin's message when the plugin says no. This one reads the bind sources of a container
(or service) creation — `HostConfig.Binds` (`-v`, compose's volumes) and `Mounts` of type bind (`--mount`)
— and refuses one that is neither under a share nor present in the guest, as Docker Desktop does ("Mounts
denied: the path … is not shared from the host and is not known to Docker"): guest paths such as
/var/run/docker.sock or /proc, and named volumes and tmpfs mounts, are not the host's and keep working.

It is its own process, started by the agent before dockerd (`boxpark.host.mountguard`), never part of PID 1:
a decision resolves a path, and on a share that is a round trip to the host, which may hang. It imports only
the standard library (`python3 -SI`; its imports take ~45 ms, once, before dockerd starts). Its bounds:
`MAX_CONNECTIONS` threads, request heads and bodies of known sizes, idle connections closed. It is a
convenience that says why a mount would be empty, not a security boundary (anyone who can reach dockerd owns
the guest): a request it cannot read — no JSON body (dockerd passes none over 1 MiB or not of type JSON), a
body it cannot parse — is allowed.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

PLUGIN = "boxpark-mounts"  # the name in daemon.json's `authorization-plugins`
SOCKET = f"/run/docker/plugins/{PLUGIN}.sock"  # where dockerd looks for a plugin of that name
MAX_CONNECTIONS = 32  # dockerd keeps 2 idle and opens more only for concurrent requests
MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024  # dockerd passes a body under 1 MiB, base64 in JSON: well under this
IDLE = 600.0  # seconds a quiet connection is kept (dockerd's client keeps its idle ones open)
ADD_SHARE = ('add a [[mounts]] entry to boxpark.toml (type = "virtiofs", source and target = a host directory '
             'holding it) or move it under your home ([home] path), then start the machine again '
             '(`boxpark down`, `boxpark up`)')

# the calls whose body names bind sources, with or without the API version prefix
_CREATES = re.compile(r"^(?:/v[0-9.]+)?/(?:containers/create|services/create|services/[^/?]+/update)(?:[?#]|$)")


@dataclass(frozen=True)
class Policy:
    """What counts as the host's: `shares` (the host directories shared into the guest, by guest path) and
    `known` (the guest's own configured mounts: tmpfs, disks), both absolute and normalised."""

    shares: tuple[str, ...] = ()
    known: tuple[str, ...] = ()
    exists: Callable[[str], bool] = field(default=os.path.exists, compare=False)
    resolve: Callable[[str], str] = field(default=os.path.realpath, compare=False)

    def refusal(self, source: str) -> str:
        """Why a bind of `source` is refused, or "" when it is allowed.

        The path is cleaned as dockerd cleans it and resolved in the guest (symlinks, `..`), so that a link
        under a share that points out of it counts for where it points. Under a share or a configured guest
        mount it is allowed even if missing (dockerd creates it there, on the host for a share); elsewhere
        only if the guest has it.
        """
        cleaned = clean(source)
        resolved = self.resolve(cleaned)
        if under(resolved, self.shares + self.known) or self.exists(resolved):
            return ""
        via = f" (it resolves to {resolved})" if resolved != cleaned else ""
        shared = ", ".join(self.shares) if self.shares else "nothing (the home share is off: [home] share)"
        return (f"Mounts denied: the path {source} is not shared from the host and is not known to the Boxpark "
                f"guest{via}. Shared from the host: {shared}. To share it, {ADD_SHARE}.")


def clean(path: str) -> str:
    """`path` as dockerd uses it (Go's filepath.Clean): no `.`, `..` or doubled slashes."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def bind_sources(uri: str, body: Any) -> list[str]:
    """The host paths a request asks dockerd to bind (absolute sources only: a name is a volume)."""
    if not _CREATES.match(uri) or not isinstance(body, dict):
        return []
    sources: list[str] = []
    host = body.get("HostConfig")
    if isinstance(host, dict):
        for bind in host.get("Binds") or ():
            parts = bind.split(":") if isinstance(bind, str) else []
            if len(parts) >= 2 and parts[0].startswith("/"):  # SOURCE:TARGET[:MODE]; one part: an anonymous volume
                sources.append(parts[0])
        sources += _bind_mounts(host.get("Mounts"))
    template = body.get("TaskTemplate")  # a swarm service
    spec = template.get("ContainerSpec") if isinstance(template, dict) else None
    if isinstance(spec, dict):
        sources += _bind_mounts(spec.get("Mounts"))
    return sources


def _bind_mounts(mounts: Any) -> list[str]:
    found = []
    for mount in mounts if isinstance(mounts, list) else ():
        if isinstance(mount, dict) and mount.get("Type") == "bind":
            source = mount.get("Source")
            if isinstance(source, str) and source.startswith("/"):
                found.append(source)
    return found


def decide(request: Any, policy: Policy) -> dict[str, Any]:
    """The answer to an AuthZReq (the JSON object dockerd sent): {"Allow": true} or a refusal with its reason."""
    if not isinstance(request, dict) or request.get("RequestMethod") != "POST":
        return {"Allow": True}
    uri = request.get("RequestUri")  # sic: dockerd's JSON name
    encoded = request.get("RequestBody")
    if not isinstance(uri, str) or not _CREATES.match(uri) or not isinstance(encoded, str) or not encoded:
        return {"Allow": True}
    try:
        body = json.loads(base64.b64decode(encoded, validate=True))
    except (ValueError, RecursionError):  # binascii.Error and JSONDecodeError are ValueErrors
        return {"Allow": True}  # dockerd itself refuses a body it cannot read
    for source in bind_sources(uri, body):
        reason = policy.refusal(source)
        if reason:
            return {"Allow": False, "Msg": reason}
    return {"Allow": True}


# ------------------------------------------------------------------------------------- the plugin's HTTP


def answer(path: str, body: bytes, policy: Policy) -> tuple[int, dict[str, Any]]:
    """The status and JSON reply to one plugin call."""
    if path == "/Plugin.Activate":
        return 200, {"Implements": ["authz"]}
    if path == "/AuthZPlugin.AuthZRes":  # the response phase: nothing to check there
        return 200, {"Allow": True}
    if path == "/AuthZPlugin.AuthZReq":
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            return 200, {"Allow": True}
        return 200, decide(request, policy)
    return 404, {"Err": f"{PLUGIN} has no {path}"}


class BadRequest(Exception):
    """The peer sent something that is not an HTTP/1.1 request we take; the connection is closed."""


def _read_request(conn: socket.socket, buffer: bytearray) -> tuple[str, bytes] | None:
    """The next request's path and body, or None at a clean end of the connection."""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            raise BadRequest("request head too long")
        chunk = conn.recv(65536)
        if not chunk:
            if buffer:
                raise BadRequest("connection closed within a request")
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[:end + 4]
    parts = head[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line {head[0][:80]!r}")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunked(conn, buffer)
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest(f"body of {length} bytes")
        body = _read_exactly(conn, buffer, length)
    return parts[1], body


def _read_exactly(conn: socket.socket, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        chunk = conn.recv(min(1 << 20, max(65536, n - len(buffer))))
        if not chunk:
            raise BadRequest("connection closed within a body")
        buffer += chunk
    data = bytes(buffer[:n])
    del buffer[:n]
    return data


def _read_line(conn: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            raise BadRequest("line too long in a chunked body")
        chunk = conn.recv(65536)
        if not chunk:
            raise BadRequest("connection closed within a body")
        buffer += chunk
    end = buffer.index(b"\r\n")
    line = bytes(buffer[:end])
    del buffer[:end + 2]
    return line


def _read_chunked(conn: socket.socket, buffer: bytearray) -> bytes:
    body = bytearray()
    while True:
        try:
            size = int(_read_line(conn, buffer).split(b";")[0], 16)
        except ValueError:
            raise BadRequest("bad chunk size") from None
        if size == 0:
            while _read_line(conn, buffer):  # trailers, up to the blank line
                pass
            return bytes(body)
        if size < 0 or len(body) + size > MAX_BODY:
            raise BadRequest("bad or overlong chunk")
        body += _read_exactly(conn, buffer, size + 2)[:size]


def serve_connection(conn: socket.socket, policy: Policy) -> None:
    """Answer the requests of one connection until the peer closes it, goes quiet for IDLE s, or errs."""
    buffer = bytearray()
    conn.settimeout(IDLE)
    try:
        while True:
            request = _read_request(conn, buffer)
            if request is None:
                return
            status, reply = answer(*request, policy)
            data = json.dumps(reply).encode()
            conn.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/vnd.docker.plugins.v1.2+json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (status, b"OK" if status == 200 else b"Not Found",
                                                            len(data), data))
    except BadRequest as exc:
        print(f"{PLUGIN}: closing a connection: {exc}", file=sys.stderr, flush=True)
    except OSError:  # the peer went, or stayed quiet past IDLE
        pass
    finally:
        conn.close()


def listen(path: str) -> socket.socket:
    """A listening unix socket at `path`, put there only once it listens: whoever sees the file can connect."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(staging)
    except FileNotFoundError:
        pass
    sock.bind(staging)
    os.chmod(staging, 0o600)
    sock.listen(64)
    os.replace(staging, path)
    return sock


def serve(sock: socket.socket, policy: Policy) -> None:
    """Accept until `sock` is closed: a thread a connection, at most MAX_CONNECTIONS (the next waits in the backlog)."""
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    threading.stack_size(256 * 1024)

    def run(conn: socket.socket) -> None:
        try:
            serve_connection(conn, policy)
        finally:
            slots.release()

    while True:
        slots.acquire()
        try:
            conn, _ = sock.accept()
        except OSError as exc:  # out of fds, say: the connections we hold end and free some
            slots.release()
            if sock.fileno() < 0:  # closed: the end
                return
            print(f"{PLUGIN}: accept: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.1)
            continue
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """`… boxpark.guest.authz [--socket PATH] [--share DIR]… [--known DIR]…`: serve until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    shares: list[str] = []
    known: list[str] = []
    path = SOCKET
    while args:
        flag, value, args = args[0], args[1] if len(args) > 1 else "", args[2:]
        if flag == "--share" and value.startswith("/"):
            shares.append(clean(value))
        elif flag == "--known" and value.startswith("/"):
            known.append(clean(value))
        elif flag == "--socket" and value:
            path = value
        else:
            sys.exit(f"{PLUGIN}: usage: [--socket PATH] [--share /DIR]... [--known /DIR]... (got {flag!r})")
    sock = listen(path)

    def stop(signum: int, frame: Any) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{PLUGIN}: listening on {path}; shared: {', '.join(shares) or 'nothing'}; "
          f"guest mounts: {', '.join(known) or 'none'}", file=sys.stderr, flush=True)
    serve(sock, Policy(tuple(shares), tuple(known)))


if __name__ == "__main__":
    main()
