"""The machine that the everyday-Docker tests of both tiers share (tests/*/test_everyday.py).

One machine a tier, configured as a user's would be for issue 6's features at once: a shared home owned by
a made-up user (1234:1234), HTTPS_PROXY pointing at a recording proxy on the host's loopback, an extra CA,
ports published by default. The checks live in portchecks, netchecks and sharechecks.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest

from tests import sharechecks
from tests.upmachine import UpMachine, load_busybox

USER = (1234, 1234)


@contextlib.contextmanager
def everyday_machine(backend: str, extra: str, tmp: Path, request: pytest.FixtureRequest) -> Iterator[UpMachine]:
    ca = sharechecks.make_ca(tmp / "ca")
    with sharechecks.recording_proxy() as proxy, sharechecks.tls_server(ca) as tls_port:
        m = UpMachine(backend)
        m.home.chmod(0o711)  # the user's virtiofsd must get through to its home, as through /home
        home = m.home / "user"
        home.mkdir()
        os.chown(home, *USER)
        https = f"http://{sharechecks.GUEST_SEES_HOST}:{proxy.port}"
        m.config.write_text(f'backend = "{backend}"\n{extra}\n[home]\npath = "{home}"\n'
                            f'[proxy]\nhttps = "{https}"\nno_proxy = "localhost"\nfrom_env = false\n'
                            f'[certificates]\nca = ["{ca.ca}"]\n')
        result = m.up()
        if result.returncode != 0:
            logs = m.logs()
            m.destroy()
            pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")
        try:
            load_busybox(m, tmp)
        except BaseException:
            m.destroy()
            raise
        m.user_home, m.ca, m.proxy, m.https, m.tls_port = home, ca, proxy, https, tls_port  # type: ignore[attr-defined]
        yield m
        if request.session.testsfailed:
            print(m.logs())
        m.destroy()
