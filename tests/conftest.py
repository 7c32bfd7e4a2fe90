"""Test set-up: offline, no outbound sockets, tiny real diffusers components built locally."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# training runs in the tests keep their VAE encodings in a throw-away folder, not in ~/.cache
os.environ.setdefault("LATENT_LAB_CACHE", os.path.join(tempfile.mkdtemp(prefix="latent-lab-cache-"), "cache"))

import socket  # noqa: E402

import pytest  # noqa: E402

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_orig_connect = socket.socket.connect
_orig_connect_ex = socket.socket.connect_ex


def _guard(sock, address):
    if sock.family == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) else address
    if host not in _LOOPBACK and not str(host).startswith("127."):
        raise ConnectionRefusedError(f"tests may not open network connections (tried {address!r})")


def _connect(self, address):
    _guard(self, address)
    return _orig_connect(self, address)


def _connect_ex(self, address):
    _guard(self, address)
    return _orig_connect_ex(self, address)


socket.socket.connect = _connect
socket.socket.connect_ex = _connect_ex


def pytest_collection_modifyitems(config, items):
    import torch
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (run benchmarks/gpu_check.sh on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_pipe():
    import lab
    return lab.load("shapes", controlnet=["scribble", "segmentation", "edges"])


@pytest.fixture(scope="session")
def tiny():
    from components import tiny_sd_components
    return tiny_sd_components()
