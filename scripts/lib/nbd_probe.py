#!/usr/bin/env python3
"""An NBD availability probe: connect, negotiate, read 4 KiB, disconnect, as a fresh client.

Used by scripts/compare-keepalived.sh so that ivha and keepalived are timed by the very same
client. Standard library only. One attempt is a new TCP connection (connect timeout
--connect-timeout-ms), the fixed newstyle handshake with NBD_OPT_GO for EXPORT, one
NBD_CMD_READ of 4096 bytes at offset 0 (simple reply: no structured replies are asked for)
and NBD_CMD_DISC. After the fault a new attempt starts every --interval-ms whether or not
the previous ones have failed yet (each on its own connection), so a SYN lost to a dead
node does not hold the next attempt back by the connect timeout.

  nbd_probe.py HOST PORT EXPORT --trigger FILE [--connect-timeout-ms 100] [--io-timeout-ms 2000]
               [--interval-ms 10] [--deadline-s 60]

First one attempt must succeed (the service is up; the client's ARP entry and Python are
warm), then the probe prints "ready" and waits for FILE to appear. FILE holds the time of the
fault (seconds since the epoch, as bash's $EPOCHREALTIME, written by whoever caused it);
the probe then attempts until one succeeds and prints
  ok MS ATTEMPT
where MS is the milliseconds from the fault to the end of the first successful read and
ATTEMPT that attempt's number (1: the first after the fault). It
exits 1 (printing "timeout ...") if none succeeds within --deadline-s.
"""

import argparse
import socket
import struct
import sys
import threading
import time

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
CMD_READ = 0
CMD_DISC = 2
READ_LENGTH = 4096


class ProbeError(Exception):
    pass


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed")
        buf += chunk
    return bytes(buf)


def attempt(host, port, export, connect_timeout, io_timeout):
    """One connect, handshake and 4 KiB read; raises on any failure."""
    sock = socket.create_connection((host, port), timeout=connect_timeout)
    try:
        sock.settimeout(io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        magic, opt_magic, server_flags = struct.unpack(">QQH", recv_exact(sock, 18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProbeError("not a newstyle NBD server")
        if not server_flags & FLAG_FIXED_NEWSTYLE:
            raise ProbeError("server does not speak fixed newstyle")
        client_flags = FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(
            struct.pack(">I", client_flags)
            + struct.pack(">QII", IHAVEOPT, OPT_GO, len(data))
            + data
        )
        while True:
            reply_magic, option, reply_type, length = struct.unpack(
                ">QIII", recv_exact(sock, 20)
            )
            if reply_magic != OPTION_REPLY_MAGIC or option != OPT_GO:
                raise ProbeError("bad option reply")
            recv_exact(sock, length)
            if reply_type & REP_FLAG_ERROR:
                raise ProbeError(f"NBD_OPT_GO refused ({reply_type:#x})")
            if reply_type == REP_ACK:
                break
            if reply_type != REP_INFO:
                raise ProbeError(f"unexpected option reply {reply_type:#x}")
        handle = 0x1BD0
        sock.sendall(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, handle, 0, READ_LENGTH)
        )
        reply_magic, error, reply_handle = struct.unpack(">IIQ", recv_exact(sock, 16))
        if reply_magic != SIMPLE_REPLY_MAGIC or reply_handle != handle:
            raise ProbeError("bad read reply")
        if error:
            raise ProbeError(f"read failed: errno {error}")
        recv_exact(sock, READ_LENGTH)
        try:
            sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, handle + 1, 0, 0))
        except OSError:
            pass
    finally:
        sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("export")
    parser.add_argument("--trigger", required=True, help="file that appears with the fault's time")
    parser.add_argument("--connect-timeout-ms", type=int, default=100)
    parser.add_argument("--io-timeout-ms", type=int, default=2000)
    parser.add_argument("--interval-ms", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=60)
    args = parser.parse_args()
    connect_timeout = args.connect_timeout_ms / 1000
    io_timeout = args.io_timeout_ms / 1000
    interval = args.interval_ms / 1000

    def once():
        attempt(args.host, args.port, args.export, connect_timeout, io_timeout)

    # Warm-up: the service must answer before the fault.
    start = time.monotonic()
    while True:
        try:
            once()
            break
        except (OSError, ProbeError) as error:
            if time.monotonic() - start > args.deadline_s:
                print(f"timeout before the fault: {error}", flush=True)
                return 1
            time.sleep(interval)
    print("ready", flush=True)

    while True:
        try:
            with open(args.trigger) as f:
                text = f.read().strip()
            if text:
                fault = float(text)
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.0005)

    # A new attempt every interval, each on its own connection and thread, so that a SYN
    # lost to the dead node (or one in a connect timeout) does not delay the next attempt:
    # the time is that of the first attempt to succeed, to within the interval.
    done = threading.Event()
    lock = threading.Lock()
    result = {}

    def run(number):
        try:
            once()
        except (OSError, ProbeError) as error:
            with lock:
                result["last_error"] = error
            return
        now = time.time()
        with lock:
            if "ok" not in result:
                result["ok"] = (now, number)
        done.set()

    attempts = 0
    while not done.is_set() and time.time() - fault < args.deadline_s:
        attempts += 1
        threading.Thread(target=run, args=(attempts,), daemon=True).start()
        done.wait(interval)
    if "ok" in result:
        end, number = result["ok"]
        print(f"ok {(end - fault) * 1000:.0f} {number}", flush=True)
        return 0
    print(f"timeout after {attempts} attempts: {result.get('last_error')}", flush=True)
    return 1

if __name__ == "__main__":
    sys.exit(main())
