"""Fixtures: pairs of engines over libfabric tcp (on loopback) and shm.

Engines use the adaptive polling mode (the default), which sleeps when idle,
so that two engines share a small machine.
"""

import pytest

import strait

PROVIDERS = ["tcp", "shm"]


def engine(provider: str, nics: int = 1, **kwargs) -> strait.TransferEngine:
    if provider == "tcp":
        kwargs.setdefault("interface", "lo")
    return strait.TransferEngine(provider, nics, **kwargs)


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return request.param


@pytest.fixture
def pair(provider):
    """(initiator, target): the initiator has 2 NICs and the target 1, so
    requests are split across unequal NIC counts."""
    a = engine(provider, 2)
    b = engine(provider, 1)
    yield a, b
    a.shutdown()
    b.shutdown()
