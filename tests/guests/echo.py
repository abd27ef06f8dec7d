"""Echo every message back until the host says goodbye.
--copy: recv_bytes() (the received slot is freed before the echo is sent); default: send the
zero-copy Message itself, then release it."""

import sys

import shmhub

link = shmhub.connect()
copy = "--copy" in sys.argv[1:]
try:
    while True:
        if copy:
            data = link.recv_bytes(timeout=30)
            link.send(data, timeout=30)
        else:
            with link.recv(timeout=30) as msg:
                link.send(msg, timeout=30)
except shmhub.HostGone:
    pass
finally:
    link.close()
