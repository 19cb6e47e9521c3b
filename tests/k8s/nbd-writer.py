#!/usr/bin/env python3
"""A client that writes to a volume without pause, for scripts/csi-rolling-update.sh.

  nbd-writer.py HOST PORT EXPORT OUT_DIR

Plain NBD (newstyle, NBD_OPT_EXPORT_NAME, simple replies), queue depth 1.
At most NBD_WRITER_RATE (200) writes a second. Write i puts its own 4 KiB pattern (i and a tag, repeated) at offset i * 4 KiB;
a FLUSH follows every 8 writes. A write counts as acknowledged once a FLUSH
after it succeeded. When the connection breaks or a request fails, the client
reconnects (every 0.1 s, for up to 180 s) and writes again every write since
the last successful FLUSH: nothing it was told failed is left unretried.

It runs until OUT_DIR/stop exists, then flushes, reads every acknowledged
write back over a new connection and prints one JSON line: writes acked,
failures (each one retried), reconnects, the longest time between two
successful requests, and whether every acknowledged block read back.
While running, OUT_DIR/gaps holds one line per second with requests:
"unix_time longest_gap_ms requests", OUT_DIR/acked the count acknowledged and
OUT_DIR/failures the count of failed requests.
"""
import json
import os
import socket
import struct
import sys
import time

HOST, PORT, EXPORT, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
BLOCK = 4096
FLUSH_EVERY = 8
RATE = float(os.environ.get("NBD_WRITER_RATE", "200"))  # writes per second, at most
TAG = 0x5354524154410000  # "STRATA"


def pattern(i):
    return struct.pack("<QQ", i, TAG ^ i) * (BLOCK // 16)


def recv(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise ConnectionError("closed by the server")
        b += c
    return bytes(b)


def connect():
    s = socket.create_connection((HOST, PORT), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdr = recv(s, 18)
    if hdr[:16] != b"NBDMAGICIHAVEOPT":
        raise ConnectionError(f"not an NBD newstyle server: {hdr!r}")
    flags = struct.unpack(">H", hdr[16:])[0]
    cflags = 1 | (2 if flags & 2 else 0)  # FIXED_NEWSTYLE, NO_ZEROES when offered
    name = EXPORT.encode()
    s.sendall(struct.pack(">I", cflags) + b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)
    size, _ = struct.unpack(">QH", recv(s, 10))
    if not cflags & 2:
        recv(s, 124)
    return s, size


class Failed(Exception):
    pass


handle = 0


def request(s, kind, offset=0, length=0, data=b""):
    global handle
    handle += 1
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, kind, handle, offset, length) + data)
    magic, err, h = struct.unpack(">IIQ", recv(s, 16))
    if magic != 0x67446698 or h != handle:
        raise ConnectionError(f"bad reply magic {magic:#x} handle {h}")
    if err:
        raise Failed(f"error {err}")
    return recv(s, length) if kind == 0 else b""


def main():
    stats = {"acked": 0, "failures": 0, "reconnects": 0, "max_gap_ms": 0.0, "errors": []}
    s, size = connect()
    limit = size // BLOCK
    acked = 0  # writes [0, acked) are acknowledged by a FLUSH
    i = 0
    last_ok = time.time()
    second, sec_gap, sec_ops = int(last_ok), 0.0, 0
    gaps = open(os.path.join(OUT, "gaps"), "w")

    def ok():
        nonlocal last_ok, second, sec_gap, sec_ops
        now = time.time()
        gap = (now - last_ok) * 1000
        last_ok = now
        if int(now) != second:
            gaps.write(f"{second} {sec_gap:.1f} {sec_ops}\n")
            gaps.flush()
            second, sec_gap, sec_ops = int(now), 0.0, 0
        sec_gap, sec_ops = max(sec_gap, gap), sec_ops + 1
        stats["max_gap_ms"] = max(stats["max_gap_ms"], gap)

    stopping = False
    started = time.time()
    while True:
        try:
            if s is None:
                deadline = time.time() + 180
                while True:
                    try:
                        s, _ = connect()
                        break
                    except OSError as e:
                        if time.time() > deadline:
                            raise SystemExit(f"nbd-writer: no connection for 180 s: {e}")
                        time.sleep(0.1)
                stats["reconnects"] += 1
                i = acked  # write again everything not yet covered by a FLUSH
            if not stopping and os.path.exists(os.path.join(OUT, "stop")):
                stopping = True
            if stopping and i == acked:
                break
            if i - acked >= FLUSH_EVERY or (stopping and i > acked) or i >= limit:
                request(s, 3)
                acked = i
                ok()
                with open(os.path.join(OUT, "acked.tmp"), "w") as f:
                    f.write(f"{acked}\n")
                os.replace(os.path.join(OUT, "acked.tmp"), os.path.join(OUT, "acked"))
                if i >= limit:
                    stopping = True
                continue
            ahead = started + i / RATE - time.time()
            if ahead > 0 and not stopping:
                time.sleep(ahead)
            request(s, 1, i * BLOCK, BLOCK, pattern(i))
            ok()
            i += 1
        except (OSError, ConnectionError, Failed) as e:
            stats["failures"] += 1
            with open(os.path.join(OUT, "failures"), "w") as f:
                f.write(f"{stats['failures']}\n")
            if len(stats["errors"]) < 20:
                stats["errors"].append(f"{time.strftime('%H:%M:%S')} write {i}: {e}")
            try:
                s.close()
            except Exception:
                pass
            s = None
    gaps.write(f"{second} {sec_gap:.1f} {sec_ops}\n")
    gaps.close()
    s.close()
    stats["acked"] = acked
    # Read every acknowledged write back on a new connection.
    s, _ = connect()
    bad = []
    for j in range(0, acked, 64):
        n = min(64, acked - j)
        data = request(s, 0, j * BLOCK, n * BLOCK)
        for k in range(n):
            if data[k * BLOCK:(k + 1) * BLOCK] != pattern(j + k):
                bad.append(j + k)
    s.close()
    stats["bad_blocks"] = len(bad)
    stats["first_bad"] = bad[:10]
    stats["max_gap_ms"] = round(stats["max_gap_ms"], 1)
    print(json.dumps(stats), flush=True)


main()
