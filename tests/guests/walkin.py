"""A walk-in guest: argv = segment path. Attach by path, echo until the message b"bye" or the
host's goodbye, then leave."""

import sys

import shmhub

link = shmhub.Guest.attach(sys.argv[1])
try:
    while True:
        with link.recv(timeout=20) as msg:
            if msg.tobytes() == b"bye":
                break
            link.send(msg, timeout=20)
except shmhub.HostGone:
    pass
finally:
    link.close()
