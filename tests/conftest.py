"""Shared pytest fixtures: the namespace fixtures (`short_tmp`, `guest_ns`) from `tests/nsfixture.py`."""

import signal

from .nsfixture import guest_ns, short_tmp  # noqa: F401  (registers the fixtures)

# A runner may start the suite under nohup: the in-process guest servers' children would inherit the ignored
# SIGHUP (a shell cannot trap it, POSIX) and the hang-up tests would see no hang-up. A caught signal is back
# to its default in a child after exec; this process still survives a hang-up. (`boxpark guest serve` does
# the same for itself: guest/server.run_forever.)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, lambda signum, frame: None)
