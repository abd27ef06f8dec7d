"""CURVE: keys from files (zmq.auth certificates); an authorized guest gets in, a guest whose key is
not authorized, or who has the wrong listener key, is refused."""

from __future__ import annotations

import os
import threading
import time

import pytest
import zmq.auth
from remoteutil import LIVENESS, T

import shmhub
from shmhub import BootstrapError, BootstrapRefused, ConfigError
from shmhub.remote import Listener


@pytest.fixture
def keys(tmp_path):
    """server.key(_secret), client.key(_secret) in tmp_path; authorized/ holds client.key only."""
    for name in ("server", "client", "stranger"):
        zmq.auth.create_certificates(str(tmp_path), name)
    auth = tmp_path / "authorized"
    auth.mkdir()
    os.link(tmp_path / "client.key", auth / "client.key")
    return tmp_path


@pytest.fixture
def secure(keys):
    lis = Listener("tcp://127.0.0.1:0", keys=keys / "server.key_secret", authorized=keys / "authorized", liveness=LIVENESS)
    yield lis
    lis.close()


def test_an_authorized_guest_talks_over_curve(keys, secure):
    out = []
    t = threading.Thread(target=lambda: out.append(shmhub.connect(secure.endpoint, keys=keys / "client.key_secret", server_key=keys / "server.key", timeout=T)))
    t.start()
    g = secure.accept(timeout=T)
    t.join(T)
    link = out[0]
    try:
        link.send(b"secret", timeout=T)
        assert g.link.recv_bytes(timeout=T) == b"secret"
        g.link.send(b"x" * 100_000, timeout=T)
        assert link.recv_bytes(timeout=T) == b"x" * 100_000
    finally:
        link.close()


def test_a_guest_with_an_unauthorized_key_is_refused(keys, secure):
    t0 = time.monotonic()
    with pytest.raises(BootstrapRefused, match="CURVE"):
        shmhub.connect(secure.endpoint, keys=keys / "stranger.key_secret", server_key=keys / "server.key", timeout=T)
    assert time.monotonic() - t0 < T / 2  # refused, not timed out
    with pytest.raises(shmhub.ShmTimeout):
        secure.accept(timeout=0.1)


def test_a_guest_with_the_wrong_listener_key_gets_nowhere(keys, secure):
    with pytest.raises(BootstrapError):
        shmhub.connect(secure.endpoint, keys=keys / "client.key_secret", server_key=keys / "stranger.key", timeout=1.0)
    with pytest.raises(shmhub.ShmTimeout):
        secure.accept(timeout=0.1)


def test_a_guest_without_keys_gets_nowhere(secure):
    with pytest.raises(BootstrapError):
        shmhub.connect(secure.endpoint, timeout=1.0)


def test_key_options_are_checked(keys):
    with pytest.raises(ConfigError, match="both"):
        shmhub.connect("tcp://127.0.0.1:1", keys=keys / "client.key_secret")
    with pytest.raises(ConfigError, match="no secret"):
        shmhub.connect("tcp://127.0.0.1:1", keys=keys / "client.key", server_key=keys / "server.key")
    with pytest.raises(ConfigError, match="cannot read"):
        Listener("tcp://127.0.0.1:0", keys=keys / "missing")
    with pytest.raises(ConfigError, match="needs keys"):
        Listener("tcp://127.0.0.1:0", authorized=keys / "authorized")
