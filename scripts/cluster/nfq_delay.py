#!/usr/bin/env python3
"""Fixed one-way delay for an emulated link, without sch_netem.

This kernel has no sch_netem (CONFIG_NET_SCH_NETEM is not set, and there are no
loadable modules), so netns.sh delays packets with an nftables `queue` rule and
this daemon: it binds one NFQUEUE queue in the current network namespace, asks
the kernel for metadata only (no payload copy, GSO packets kept whole), and
accepts every packet `--delay-us` microseconds after it was queued, in arrival
order, with batch verdicts (one verdict accepts every packet up to an id).

Standard library only. Run it inside the namespace (ip netns exec NS ...).
If it dies, the rule's `bypass` flag lets packets through undelayed.
"""
import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_CFG_F_GSO = 4
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_ACCEPT = 1


def attr(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


class Queue:
    def __init__(self, num):
        self.num = num
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))

    def send(self, msgtype, attrs, flags=0):
        self.seq += 1
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", self.num) + b"".join(attrs)
        header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msgtype,
                             NLM_F_REQUEST | flags, self.seq, 0)
        self.sock.send(header + body)

    def config(self, attrs):
        self.send(NFQNL_MSG_CONFIG, attrs, NLM_F_ACK)
        data = self.sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", data, 0)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, 16)
            if err:
                raise OSError(-err, "nfqueue config: " + os.strerror(-err))

    def bind(self, maxlen):
        self.config([attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0))])
        self.config([attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))])
        self.config([attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))])
        flags = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN
        self.config([attr(NFQA_CFG_FLAGS, struct.pack("!I", flags)),
                     attr(NFQA_CFG_MASK, struct.pack("!I", flags))])

    def accept_upto(self, packet_id):
        self.send(NFQNL_MSG_VERDICT_BATCH, [attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))])


def packet_ids(data):
    """Ids of the packet messages in one netlink datagram."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + 20  # nlmsghdr + nfgenmsg
            end = off + length
            while a + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if akind & 0x3FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, a + 4)[0]
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay-us", type=int, required=True)
    parser.add_argument("--maxlen", type=int, default=200000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    q = Queue(args.queue)
    q.bind(args.maxlen)
    q.sock.setblocking(False)
    delay = args.delay_us / 1e6
    pending = collections.deque()  # (due, id), ids increasing
    fd = q.sock.fileno()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        # select() has microsecond resolution (poll/epoll round up to milliseconds)
        if pending:
            select.select([fd], [], [], max(0.0, pending[0][0] - time.monotonic()))
        else:
            select.select([fd], [], [], 1.0)
        now = time.monotonic()
        while True:
            try:
                n = q.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            for pid in packet_ids(view[:n]):
                pending.append((now + delay, pid))
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:
            q.accept_upto(last)


if __name__ == "__main__":
    main()
