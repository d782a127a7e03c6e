"""Two engines in two processes (multiprocessing, spawn), and the example."""

import multiprocessing as mp
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import strait

from conftest import engine

TIMEOUT = 30


def peer(conn, provider: str) -> None:
    """The other process: receives a write, answers a message, and offers a
    region to read."""
    with engine(provider, 2) as e:
        inbox = np.zeros(1 << 20, dtype=np.uint8)
        offer = np.arange(4096, dtype=np.uint16)
        inbox_region = e.register(inbox, remote="write")
        offer_region = e.register(offer, remote="read")
        arrived = e.expect_imm(1)
        conn.send((e.address, inbox_region.descriptor, offer_region.descriptor))
        arrived.wait(TIMEOUT)
        conn.send(int(inbox.astype(np.uint64).sum()))
        parent_address = conn.recv()
        msg = e.alloc(64)
        msg.write(b"from the child")
        e.send(parent_address, msg, nbytes=14).wait(TIMEOUT)
        assert conn.recv() == "done"


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_two_processes(provider):
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=peer, args=(theirs, provider))
    child.start()
    try:
        with engine(provider) as e:
            _, inbox, offer = ours.recv()
            data = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
            e.write(e.register(data), inbox, imm=1).wait(TIMEOUT)
            assert ours.poll(TIMEOUT)
            assert ours.recv() == int(data.astype(np.uint64).sum())

            local = np.zeros(4096, dtype=np.uint16)
            e.read(e.register(local), offer).wait(TIMEOUT)
            assert np.array_equal(local, np.arange(4096, dtype=np.uint16))

            ours.send(e.address)
            assert e.recv(timeout=TIMEOUT) == b"from the child"
            ours.send("done")
        child.join(TIMEOUT)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_example_moves_an_array(provider):
    example = pathlib.Path(__file__).parent.parent / "examples" / "move_array.py"
    out = subprocess.run(
        [sys.executable, str(example), "--provider", provider, "--mib", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "matches" in out.stdout


@pytest.mark.parametrize(
    "script,args,says",
    [
        ("kv_prefill_decode.py", ["--layers", "8", "--tokens", "256"], "every byte checked"),
        ("moe_dispatch_combine.py", ["--ranks", "2"], "combine = 2x"),
        ("weights_push.py", ["--steps", "2"], "weights match on every destination"),
    ],
)
def test_primitive_examples(script, args, says):
    example = pathlib.Path(__file__).parent.parent / "examples" / script
    out = subprocess.run([sys.executable, str(example), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert says in out.stdout, out.stdout


def test_import_and_docs(tmp_path):
    """The package imports without libfabric being touched, and the classes
    carry their docs (what help() shows)."""
    code = "import strait, pydoc; print(pydoc.plain(pydoc.render_doc(strait.TransferEngine)))"
    # Outside the source tree, so that the installed package is imported.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for text in ("group of NICs", "write_paged", "expect_imm", "Registers the memory of"):
        assert text in out.stdout
    package = pathlib.Path(strait.__file__).parent
    assert (package / "py.typed").exists() and (package / "_strait.pyi").exists()
