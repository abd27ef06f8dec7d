"""close() while other threads block: argv = JSON timeouts. A receiver thread blocks in recv() and
a sender thread in send() into a full ring (the host never reads); the main thread closes the
link: close() must return and both threads must get LinkClosed within 1 s. Exit 0 if so."""

import sys
import threading
import time

import shmhub

link = shmhub.connect()
while True:  # fill the ring: the host never reads
    try:
        link.send(b"", timeout=0)
    except shmhub.ShmTimeout:
        break
results = {}


def blocked(name, fn):
    t0 = time.monotonic()
    try:
        fn()
        results[name] = ("returned", None)
    except BaseException as e:
        results[name] = (type(e).__name__, time.monotonic() - t0)


threads = [
    threading.Thread(target=blocked, args=("recv", lambda: link.recv(timeout=20))),
    threading.Thread(target=blocked, args=("send", lambda: link.send(b"x", timeout=20))),
]
for t in threads:
    t.start()
time.sleep(0.3)  # both are asleep by now
t0 = time.monotonic()
link.close()
closed_at = time.monotonic()
for t in threads:
    t.join(20)
failures = []
if closed_at - t0 > 1:
    failures.append(f"close() took {closed_at - t0:.2f} s")
for name in ("recv", "send"):
    kind, _ = results.get(name, ("hung", None))
    if kind != "LinkClosed":
        failures.append(f"{name}: {kind}")
    elif time.monotonic() - t0 > 0 and results[name][1] - 0.3 > 1.5:
        failures.append(f"{name} got LinkClosed {results[name][1] - 0.3:.2f} s after close()")
if failures:
    sys.exit("closer: " + "; ".join(failures))
