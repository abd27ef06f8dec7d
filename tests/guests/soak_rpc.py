"""RPC guest of the soak test: serves add(a, b) and blob(n, seed) (n seeded bytes) until the
host says goodbye or dies."""

import random

import shmhub
from shmhub import rpc


def add(a: int, b: int) -> int:
    return a + b


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


rpc.serve(shmhub.connect(), {"add": add, "blob": blob})
