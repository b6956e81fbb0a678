"""The mount guard's decision (a request body in, allow or refuse with a message out) and its plugin protocol
over a real unix socket, as dockerd speaks it."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from boxpark.guest import authz
from boxpark.guest.authz import Policy, bind_sources, clean, decide


def request(uri: str, body: Any, method: str = "POST") -> dict[str, Any]:
    """An AuthZReq as dockerd sends it: the API request's body base64-encoded (Go's []byte in JSON)."""
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    return {"User": "", "RequestMethod": method, "RequestUri": uri, "RequestBody": base64.b64encode(raw).decode(),
            "RequestHeaders": {"Content-Type": "application/json"}}


def guest(tmp_path: Path, shares: tuple[str, ...] = (), known: tuple[str, ...] = ()) -> Policy:
    """A policy whose guest is the directory tree under `tmp_path` (paths are taken relative to it)."""
    root = str(tmp_path)

    def inside(path: str) -> str:
        return root + path

    def resolve(path: str) -> str:
        real = os.path.realpath(inside(path))
        return real[len(root):] or "/" if real.startswith(root) else real

    return Policy(shares=shares, known=known, exists=lambda p: os.path.exists(inside(p)), resolve=resolve)


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    for directory in ("home/me/project", "var/run", "proc", "tmp"):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "var/run/docker.sock").touch()
    (tmp_path / "home/me/out").symlink_to("/tmp/x")  # a link under the share pointing out of it
    (tmp_path / "home/me/in").symlink_to("/home/me/project")
    return guest(tmp_path, shares=("/home/me",), known=("/srv/disk",))


def create(binds: list[str] | None = None, mounts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"Image": "busybox", "HostConfig": {"Binds": binds, "Mounts": mounts}}


def test_a_bind_of_a_path_neither_shared_nor_in_the_guest_is_refused_with_the_path_the_shares_and_the_key(
        policy: Policy) -> None:
    answer = decide(request("/v1.41/containers/create?name=web", create(["/tmp/x:/data"])), policy)
    assert answer["Allow"] is False
    assert "Mounts denied: the path /tmp/x is not shared from the host" in answer["Msg"]
    assert "/home/me" in answer["Msg"] and "[[mounts]]" in answer["Msg"]


def test_a_request_as_dockerd_sends_it_is_read() -> None:
    # dockerd 20.10's AuthZReq, as captured in the guest (note "RequestUri"); the body is Go's []byte: base64
    body = base64.b64encode(b'{"Image":"busybox","HostConfig":{"Binds":["/tmp/x:/d"]}}').decode()
    sent = ('{"RequestMethod":"POST","RequestUri":"/v1.41/containers/create","RequestBody":"%s",'
            '"RequestHeaders":{"Content-Length":"1752","Content-Type":"application/json"}}' % body)
    nothing = Policy(shares=("/root",), exists=lambda path: False, resolve=lambda path: path)
    status, reply = authz.answer("/AuthZPlugin.AuthZReq", sent.encode(), nothing)
    assert status == 200 and reply["Allow"] is False and "/tmp/x" in reply["Msg"]


def test_mount_type_bind_and_services_are_checked_too(policy: Policy) -> None:
    mount = {"Type": "bind", "Source": "/opt/data", "Target": "/data"}
    assert decide(request("/containers/create", create(mounts=[mount])), policy)["Allow"] is False
    service = {"TaskTemplate": {"ContainerSpec": {"Image": "busybox", "Mounts": [mount]}}}
    assert decide(request("/v1.41/services/create", service), policy)["Allow"] is False
    assert decide(request("/v1.41/services/abc/update?version=3", service), policy)["Allow"] is False


@pytest.mark.parametrize("binds, mounts", [
    (["/home/me/project:/src"], None),  # under the share
    (["/home/me/not-yet:/src:ro"], None),  # under the share, missing: dockerd makes it on the host
    (["/home/me/in:/src"], None),  # a link that stays in the share
    (["/var/run/docker.sock:/var/run/docker.sock"], None),  # the guest's own
    (["/proc:/host/proc:ro", "/tmp:/t"], None),
    (["/srv/disk/new:/d"], None),  # under a configured guest mount
    (["cache:/cache", "/anonymous"], None),  # a named volume, an anonymous one
    (None, [{"Type": "volume", "Source": "cache", "Target": "/c"}, {"Type": "tmpfs", "Target": "/t"}]),
    (None, [{"Type": "bind", "Source": "/home/me/project", "Target": "/src"}]),
    (None, None),
])
def test_shared_guest_and_volume_sources_are_allowed(policy: Policy, binds: list[str] | None,
                                                     mounts: list[dict[str, Any]] | None) -> None:
    assert decide(request("/v1.41/containers/create", create(binds, mounts)), policy) == {"Allow": True}


def test_a_link_out_of_a_share_counts_for_where_it_points(policy: Policy) -> None:
    answer = decide(request("/containers/create", create(["/home/me/out:/data"])), policy)
    assert answer["Allow"] is False and "resolves to /tmp/x" in answer["Msg"]


def test_dot_dot_cannot_climb_out_of_a_share(policy: Policy) -> None:
    answer = decide(request("/containers/create", create(["/home/me/project/../../../opt/x:/data"])), policy)
    assert answer["Allow"] is False and "/opt/x" in answer["Msg"]
    assert clean("//home/./me/../me/") == "/home/me"


def test_one_refused_source_refuses_the_whole_request(policy: Policy) -> None:
    body = create(["/home/me/project:/src", "/opt/data:/data"])
    assert decide(request("/containers/create", body), policy)["Allow"] is False


def test_without_any_share_the_message_says_the_home_share_is_off(tmp_path: Path) -> None:
    answer = decide(request("/containers/create", create(["/work/x:/x"])), guest(tmp_path))
    assert "Shared from the host: nothing" in answer["Msg"] and "[home] share" in answer["Msg"]


@pytest.mark.parametrize("req", [
    request("/v1.41/containers/create", create(["/tmp/x:/data"]), method="GET"),
    request("/v1.41/containers/abc/start", create(["/tmp/x:/data"])),  # not a creation
    request("/v1.41/containers/create", b"{not json"),
    request("/v1.41/containers/create", b"[1, 2]"),
    request("/v1.41/containers/create", {"HostConfig": {"Binds": "/tmp/x:/data", "Mounts": {"Type": "bind"}}}),
    {"RequestMethod": "POST", "RequestUri": "/containers/create"},  # no body passed (chunked or over 1 MiB)
    {"RequestMethod": "POST", "RequestUri": "/containers/create", "RequestBody": "%%%"},
    "not an object",
])
def test_what_it_cannot_read_it_allows(policy: Policy, req: Any) -> None:
    assert decide(req, policy) == {"Allow": True}


def test_bind_sources_reads_binds_and_bind_mounts_only() -> None:
    body = create(["/a:/x", "vol:/y", "/b:/z:ro,rshared", "/only-a-target"],
                  [{"Type": "bind", "Source": "/c", "Target": "/w"}, {"Type": "volume", "Source": "v"}])
    assert bind_sources("/v1.44/containers/create", body) == ["/a", "/b", "/c"]
    assert bind_sources("/v1.44/containers/createx", body) == []


# ------------------------------------------------------------------------------------- the plugin over HTTP


@pytest.fixture
def plugin(tmp_path: Path, policy: Policy) -> Any:
    path = str(tmp_path / "run/docker/plugins/boxpark-mounts.sock")
    sock = authz.listen(path)
    thread = threading.Thread(target=authz.serve, args=(sock, policy), daemon=True)
    thread.start()
    yield path
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    thread.join(30)
    assert not thread.is_alive()


def call(conn: socket.socket, path: str, body: bytes, chunked: bool = False) -> tuple[int, dict[str, Any]]:
    """One POST on a kept-alive connection, as Go's net/http sends it; the status and JSON reply."""
    if chunked:
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        head = b"Transfer-Encoding: chunked\r\n"
    else:
        payload, head = body, b"Content-Length: %d\r\n" % len(body)
    conn.sendall(b"POST %s HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\n%s\r\n%s"
                 % (path.encode(), head, payload))
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head_, _, rest = data.partition(b"\r\n\r\n")
    length = int([line for line in head_.split(b"\r\n") if line.lower().startswith(b"content-length:")][0]
                 .split(b":")[1])
    while len(rest) < length:
        rest += conn.recv(65536)
    return int(head_.split(b" ")[1]), json.loads(rest)


def test_the_plugin_activates_and_answers_requests_and_responses_on_one_connection(plugin: str) -> None:
    assert oct(os.stat(plugin).st_mode & 0o777) == "0o600"
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(plugin)
        assert call(conn, "/Plugin.Activate", b"") == (200, {"Implements": ["authz"]})
        refused = json.dumps(request("/v1.41/containers/create", create(["/tmp/x:/data"]))).encode()
        status, reply = call(conn, "/AuthZPlugin.AuthZReq", refused)
        assert status == 200 and reply["Allow"] is False and "/tmp/x" in reply["Msg"]
        allowed = json.dumps(request("/v1.41/containers/create", create(["/home/me/project:/src"]))).encode()
        assert call(conn, "/AuthZPlugin.AuthZReq", allowed, chunked=True) == (200, {"Allow": True})
        assert call(conn, "/AuthZPlugin.AuthZRes", refused) == (200, {"Allow": True})
        assert call(conn, "/Nope", b"{}")[0] == 404


def test_junk_closes_that_connection_and_the_plugin_goes_on(plugin: str) -> None:
    for junk in (b"GARBAGE\r\n\r\n", b"POST /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                 b"POST /x HTTP/1.1\r\n" + b"A" * (authz.MAX_HEAD + 10)):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(plugin)
            conn.sendall(junk)
            conn.settimeout(30)
            assert conn.recv(100) == b""  # closed without an answer
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(plugin)
        assert call(conn, "/Plugin.Activate", b"")[0] == 200
