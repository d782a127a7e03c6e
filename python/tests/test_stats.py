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
