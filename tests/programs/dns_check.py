#!/usr/bin/env python3
"""A DNS client for tests/programs/run.sh's knot-resolver part (127.0.0.1 only).

  dns_check.py query PORT NAME ADDRESS UDP_COUNT TCP_COUNT
      UDP_COUNT queries over UDP (up to 32 in flight, each with its own id)
      and TCP_COUNT pipelined on one TCP connection, for the A record of
      NAME; every answer must carry its query's id, NOERROR, the question
      and one A record with ADDRESS. Exit 0, or 1 naming the first wrong one.
  dns_check.py ready PORT NAME
      waits (up to 10 s) until a UDP query is answered.
  dns_check.py bind-on-line PORT
      reads one line from stdin, then binds UDP 127.0.0.1:PORT at once
      (no SO_REUSEADDR, as a restarted server would) and says whether it got
      it: exit 0 if it did, 1 if the port is still bound.
"""
import errno
import socket
import struct
import sys
import time


def question(name):
    labels = name.rstrip(".").split(".")
    return b"".join(bytes([len(p)]) + p.encode() for p in labels) + b"\0" + struct.pack(">HH", 1, 1)


def query(qid, name):
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question(name)


def check(reply, qid, name, address):
    """None when `reply` is the right answer to query `qid`, else why not."""
    if len(reply) < 12:
        return "short reply"
    rid, flags, qd, an = struct.unpack(">HHHH", reply[:8])
    if rid != qid:
        return f"id {rid}, not {qid}"
    if not flags & 0x8000 or flags & 0xF:
        return f"flags {flags:#06x} (not a NOERROR response)"
    q = question(name)
    if qd != 1 or reply[12:12 + len(q)] != q:
        return "the question is not the one asked"
    if an != 1:
        return f"{an} answers, not 1"
    rdata = reply[-4:]
    if reply[-6:-4] != b"\x00\x04" or socket.inet_ntoa(rdata) != address:
        return f"answer {socket.inet_ntoa(rdata)}, not {address}"
    return None


def udp_queries(port, name, address, count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    pending = {}
    sent = done = 0
    next_id = 1
    while done < count:
        while sent < count and len(pending) < 32:
            pending[next_id] = True
            s.send(query(next_id, name))
            next_id += 1
            sent += 1
        try:
            reply = s.recv(4096)
        except socket.timeout:
            return f"UDP: no answer in 5 s ({len(pending)} waiting, {done} answered)"
        rid = struct.unpack(">H", reply[:2])[0]
        if rid not in pending:
            return f"UDP: an answer to id {rid}, which was not asked or was answered already"
        why = check(reply, rid, name, address)
        if why:
            return f"UDP query {rid}: {why}"
        del pending[rid]
        done += 1
    return None


def tcp_queries(port, name, address, count):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    out = b"".join(struct.pack(">H", len(m)) + m for m in (query(i + 1, name) for i in range(count)))
    s.sendall(out)
    buf = b""
    seen = set()
    while len(seen) < count:
        while len(buf) < 2 or len(buf) < 2 + struct.unpack(">H", buf[:2])[0]:
            try:
                more = s.recv(65536)
            except socket.timeout:
                return f"TCP: no answer in 5 s ({len(seen)} of {count} answered)"
            if not more:
                return f"TCP: the connection closed after {len(seen)} of {count} answers"
            buf += more
        n = struct.unpack(">H", buf[:2])[0]
        reply, buf = buf[2:2 + n], buf[2 + n:]
        rid = struct.unpack(">H", reply[:2])[0]
        if rid in seen or not 1 <= rid <= count:
            return f"TCP: an answer to id {rid}, not asked or answered already"
        why = check(reply, rid, name, address)
        if why:
            return f"TCP query {rid}: {why}"
        seen.add(rid)
    s.close()
    return None


def main(argv):
    mode = argv[1]
    port = int(argv[2])
    if mode == "query":
        name, address, n_udp, n_tcp = argv[3], argv[4], int(argv[5]), int(argv[6])
        why = udp_queries(port, name, address, n_udp) or tcp_queries(port, name, address, n_tcp)
        if why:
            print(f"dns_check: {why}")
            return 1
        print(f"dns_check: {n_udp} UDP and {n_tcp} TCP answers, each right")
        return 0
    if mode == "ready":
        end = time.monotonic() + 10
        while time.monotonic() < end:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.2)
            try:
                s.sendto(query(7, argv[3]), ("127.0.0.1", port))
                s.recvfrom(4096)
                return 0
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        print("dns_check: no answer in 10 s")
        return 1
    if mode == "bind-on-line":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sys.stdin.readline()
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                print(f"dns_check: port {port} still bound right after its owner died")
                return 1
            raise
        print(f"dns_check: port {port} free at once")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
