"""TransferEngine.stats(): exact counts after a known workload, labels,
latency counts, and the table and Prometheus texts."""

import numpy as np

import strait

from conftest import engine

TIMEOUT = 30


def test_stats_count_a_known_workload(provider):
    with engine(provider) as a, engine(provider) as b:
        src = a.register(np.ones(1 << 16, dtype=np.uint8))
        dst = b.register(np.zeros(20 << 16, dtype=np.uint8), remote="write")
        arrived = b.expect_imm(3, 10)
        a.label_peer(b.address, "target")
        before = a.stats()["nics"][0]["posted"]["writes"]
        for i in range(20):
            a.write(src, dst.descriptor, dst_offset=i << 16, imm=3 if i < 10 else None).wait(TIMEOUT)
        arrived.wait(TIMEOUT)
        s = a.stats()
        assert s["nics"][0]["posted"]["writes"] - before == 20
        peer = next(p for p in s["peers"] if p["label"] == "target")
        assert peer["requests_ok"] == 20 and peer["requests_failed"] == 0
        assert peer["bytes_posted"] == 20 << 16 and peer["imms_out"] == 10
        assert peer["in_flight"] == 0 and peer["oldest_in_flight"] is None
        assert s["latency"]["write"]["count"] == 20
        assert 0 < s["latency"]["write"]["p50"] <= s["latency"]["write"]["max"]
        assert b.stats()["nics"][0]["imms_in"] >= 10
        sb = b.stats()
        assert sb["nics"][0]["receives_posted"] == sb["receive_buffers"]
        # The target timed its counter: armed to reached.
        assert b.stats()["latency"]["imm"]["count"] == 1 and a.stats()["latency"]["imm"]["count"] == 0
        table = a.stats_text()
        assert "target" in table and "write requests: 20" in table
        prom = a.stats_text("prometheus", prefix="app")
        assert 'app_peer_requests_total{peer="target",outcome="ok"} 20' in prom
        try:
            a.stats_text("xml")
        except strait.InvalidRequestError:
            pass
        else:
            raise AssertionError("an unknown format was accepted")


def test_short_pages_are_packed_on_tcp_and_counted():
    """tcp packs writes of short runs (here 64 pages of 1 KiB) by default;
    ``packing=0`` turns it off on the target, whose regions then take
    direct writes. Bytes are exact either way."""
    page, pages = 1024, 64
    data = np.random.default_rng(5).integers(0, 256, page * pages, dtype=np.uint8)
    src_pages = list(range(0, pages, 2))
    dst_pages = [pages - 1 - p for p in src_pages]
    for target_packing, packed in [(None, 1), (0, 0)]:
        with engine("tcp") as a, engine("tcp", packing=target_packing) as b:
            src = a.register(data.copy())
            out = np.zeros(page * pages, dtype=np.uint8)
            dst = b.register(out, remote="write")
            arrived = b.expect_imm(12, 1)
            a.write_paged(src, dst.descriptor, src_pages, dst_pages, page_size=page, imm=12).wait(TIMEOUT)
            arrived.wait(TIMEOUT)
            for s, d in zip(src_pages, dst_pages):
                assert (out[d * page:(d + 1) * page] == data[s * page:(s + 1) * page]).all()
            assert a.stats()["packed"]["requests"] == packed
            assert b.stats()["packed"]["served"] == a.stats()["packed"]["chunks"]
            assert ("packed: 1 requests" in a.stats_text()) == bool(packed)
            prom = a.stats_text("prometheus", prefix="app")
            assert f"app_packed_requests_total {packed}" in prom
