"""Consume nothing until SIGUSR1, then drain every message there is, then idle (no sends) until
the host says goodbye. Exit 2 if no signal comes within 30 s."""

import signal
import sys
import time

import shmhub

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
link = shmhub.connect()
try:
    if signal.sigtimedwait({signal.SIGUSR1}, 30) is None:
        sys.exit(2)
    while (msg := link.try_recv()) is not None:
        msg.release()
    deadline = time.monotonic() + 60
    while not link.segment.host_goodbye and time.monotonic() < deadline:
        time.sleep(0.01)
finally:
    link.close()
