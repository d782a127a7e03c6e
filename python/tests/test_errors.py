"""Bad input raises the right exception, and nothing is posted."""

import numpy as np
import pytest

import strait

from conftest import engine


@pytest.fixture
def regions(pair):
    a, b = pair
    src = a.alloc(4096)
    dst = b.alloc(4096, remote="write")
    return a, b, src, dst


def test_corrupt_descriptor_bytes(regions):
    a, _, src, dst = regions
    good = dst.descriptor
    bad = [
        b"",
        good[:3],
        good[: len(good) // 2],
        good[:-1],
        good + b"\0",
        b"\xff" + good[1:],
        bytes(len(good)),
    ]
    for data in bad:
        with pytest.raises(strait.InvalidDescriptorError):
            strait.Descriptor(data)
        with pytest.raises(strait.InvalidDescriptorError):
            a.write(src, data)
    with pytest.raises(strait.InvalidDescriptorError):
        a.write(src, "not a descriptor")  # type: ignore[arg-type]
    with pytest.raises(strait.InvalidDescriptorError):
        a.write(src, 12345)  # type: ignore[arg-type]
    # Invalid descriptors are also ValueErrors.
    assert issubclass(strait.InvalidDescriptorError, ValueError)


def test_bad_addresses(regions):
    a, _, src, _ = regions
    for address in (b"", b"\x00" * 7, "zz", "abc"):
        with pytest.raises(strait.InvalidDescriptorError):
            a.send(address, src, nbytes=1)


def test_out_of_range(regions):
    a, b, src, dst = regions
    cases = [
        dict(nbytes=4097),
        dict(nbytes=1, src_offset=4096),
        dict(nbytes=1, dst_offset=4096),
        dict(nbytes=2**63, src_offset=2**63),
        dict(nbytes=16, dst_offset=2**64 - 8),
    ]
    for kwargs in cases:
        with pytest.raises(strait.OutOfBoundsError):
            a.write(src, dst.descriptor, **kwargs)
    with pytest.raises(strait.InvalidRequestError):
        a.write_paged(src, dst.descriptor, [0], [1], page_size=4096)
    with pytest.raises(OverflowError):
        a.write(src, dst.descriptor, nbytes=-1)
    with pytest.raises(strait.InvalidRequestError):
        a.write(src, dst.descriptor, nbytes=0)  # zero-length without an immediate
    with pytest.raises(strait.OutOfBoundsError):
        dst.read(4000, 200)
    with pytest.raises(strait.OutOfBoundsError):
        dst.write(b"x" * 10, 4090)


def test_access_is_checked(regions):
    a, b, src, _ = regions
    local_only = b.alloc(4096)
    with pytest.raises(strait.RemoteAccessError):
        a.write(src, local_only.descriptor)
    with pytest.raises(strait.RemoteAccessError):
        a.read(src, local_only.descriptor)
    assert issubclass(strait.RemoteAccessError, PermissionError)


def test_unsupported_objects(pair):
    a, _ = pair
    for obj in (object(), 42, "text", [1, 2, 3]):
        with pytest.raises(strait.UnsupportedObjectError):
            a.register(obj)
    with pytest.raises(strait.UnsupportedObjectError):
        a.register(np.zeros((8, 8))[:, ::2])
    with pytest.raises(strait.UnsupportedObjectError):
        a.register(np.zeros((8, 8)).T)
    with pytest.raises(strait.UnsupportedObjectError):
        a.register(memoryview(bytearray(16))[::2])
    assert issubclass(strait.UnsupportedObjectError, TypeError)


def test_invalid_memory(pair):
    a, _ = pair
    with pytest.raises(strait.RegisterMemoryError):
        a.register(np.zeros(0, dtype=np.uint8))
    with pytest.raises(strait.RegisterMemoryError):
        a.register(bytearray())
    with pytest.raises(strait.InvalidRequestError):
        a.alloc(0)
    with pytest.raises(strait.InvalidRequestError):
        a.register(b"read-only", remote="write")
    with pytest.raises(strait.InvalidRequestError):
        a.register(bytearray(4), remote="everything")


def test_read_only_region_cannot_be_a_destination(regions):
    a, b, _, _ = regions
    remote = b.alloc(64, remote="read")
    frozen = a.register(b"0123456789")
    with pytest.raises(strait.InvalidRequestError):
        a.read(frozen, remote.descriptor, nbytes=4)
    with pytest.raises(strait.InvalidRequestError):
        frozen.write(b"x")


def test_closed_region(regions):
    a, _, src, dst = regions
    src.close()
    assert src.closed
    with pytest.raises(strait.InvalidRequestError):
        a.write(src, dst.descriptor)
    src.close()  # idempotent


def test_bad_arguments():
    with pytest.raises(strait.InvalidRequestError):
        strait.TransferEngine("infiniband")
    with pytest.raises(strait.InvalidRequestError):
        strait.TransferEngine("tcp", interface="lo", poll="sometimes")
    with pytest.raises(strait.InvalidRequestError):
        strait.TransferEngine("tcp", 0, interface="lo")
    with pytest.raises(strait.BackendUnavailableError):
        strait.TransferEngine("tcp", interface="no-such-interface0")
    with pytest.raises(strait.InvalidRequestError, match="efa-direct"):
        strait.TransferEngine("tcp", interface="lo", efa_fabric="efa-indirect")
    # The fabric is EFA's alone: a tcp engine takes either and ignores it.
    strait.TransferEngine("tcp", interface="lo", efa_fabric="efa-direct").shutdown()
    with pytest.raises(strait.InvalidRequestError, match="GPU 4096 not found"):
        strait.TransferEngine("tcp", interface="lo", gpu=4096)
    assert isinstance(strait.gpu_nic_map(), dict)


def test_verbs_without_a_device_is_backend_unavailable():
    verbs = [r for r in strait.probe() if r[0] == "verbs"]
    assert verbs, "probe() lists the verbs backend"
    if verbs[0][1]:
        pytest.skip(f"this machine has a verbs device: {verbs[0][2]}")
    with pytest.raises(strait.BackendUnavailableError, match="verbs"):
        strait.TransferEngine("verbs")
    with pytest.raises(strait.BackendUnavailableError, match="verbs"):
        strait.TransferEngine("verbs", verbs_devices=["mlx5_0"], verbs_port=1, verbs_gid_index=3)
    with pytest.raises(OverflowError):
        strait.TransferEngine("verbs", verbs_port=300)


def test_negative_timeout(pair):
    _, b = pair
    with pytest.raises(strait.InvalidRequestError):
        b.recv(timeout=-1)


def test_region_of_another_engine(provider):
    a, b = engine(provider), engine(provider)
    try:
        theirs = b.alloc(64)
        dst = b.alloc(64, remote="write")
        with pytest.raises(strait.InvalidRequestError):
            a.write(theirs, dst.descriptor)
    finally:
        a.shutdown()
        b.shutdown()
