"""The wheel scripts/test.sh built (STRAIT_WHEEL) installs into a fresh
venv with no Rust toolchain on PATH and no network, imports, moves bytes,
and on a machine without libfabric raises BackendUnavailableError on use."""

import os
import subprocess
import sys
import zipfile

import pytest

WHEEL = os.environ.get("STRAIT_WHEEL")

SMOKE = r"""
import os, strait
if os.environ.get("STRAIT_LIBFABRIC"):
    try:
        strait.TransferEngine("tcp", interface="lo")
    except strait.BackendUnavailableError as e:
        print("unavailable:", e)
    else:
        raise SystemExit("an engine opened without libfabric")
else:
    with strait.TransferEngine("tcp", interface="lo") as a, strait.TransferEngine("tcp", interface="lo") as b:
        src, dst = a.alloc(1 << 20), b.alloc(1 << 20, remote="write")
        src.write(bytes(range(256)) * 4096)
        done = b.expect_imm(3)
        a.write(src, dst.descriptor, imm=3).wait(30)
        done.wait(30)
        assert dst.read(0, 1 << 20) == bytes(range(256)) * 4096
        print("moved 1 MiB with strait", strait.__version__)
"""


@pytest.mark.skipif(not WHEEL, reason="STRAIT_WHEEL is not set (scripts/test.sh sets it to the wheel it built)")
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    names = zipfile.ZipFile(WHEEL).namelist()
    assert any(n.startswith("strait/_strait") and n.endswith(".so") for n in names), names
    assert "abi3" in os.path.basename(WHEEL), WHEEL
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    assert subprocess.run(["sh", "-c", "command -v cargo"], env=env).returncode != 0, "cargo is on the smoke test's PATH"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", WHEEL], check=True, env=env)
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE)
    run = subprocess.run([py, str(script)], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "moved 1 MiB" in run.stdout
    missing = dict(env, STRAIT_LIBFABRIC="/nonexistent/libfabric.so.1")
    run = subprocess.run([py, str(script)], env=missing, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "unavailable:" in run.stdout and "libfabric" in run.stdout
