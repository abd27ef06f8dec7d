"""`python -m shmhub.http APP ...`: a worker guest (the front spawns these; see _worker.py)."""

from ._worker import main

main()
