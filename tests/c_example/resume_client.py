#!/usr/bin/env python3
"""Resumption client for tests/c_example.rs, using only the standard library's ssl module.

Connects once to the prefork example server, keeps the session, then reconnects RUNS times
offering it, and prints one JSON line:

  {"tls": "1.2", "runs": 30, "resumed": 30, "body_reused": 30, "first_pid": 123,
   "pids": [123, 124], "failures": 0}

"resumed" counts SSLSocket.session_reused (the client's view), "body_reused" the server's
own "reused 1" in the reply, "pids" the distinct worker pids that served a resumed
connection, "max_data_segs_in" the most TCP segments with data the client received on one
resumed connection (Linux TCP_INFO tcpi_data_segs_in; -1 where the kernel does not say),
"median_ms" / "max_ms" the wall time of the resumed connections (connect to EOF).
Certificates are not verified: the server uses a throwaway self-signed one.

TLS 1.2 resumes by session id (tickets off on both sides). TLS 1.3 resumes by ticket: the
server sends it after the handshake, so a connection's session is only resumable once the
reply has been read, and each connection offers the most recent session.
"""

import argparse
import json
import re
import socket
import ssl
import statistics
import struct
import sys
import time

# Offset of tcpi_data_segs_in in Linux's struct tcp_info (since 4.6).
TCPI_DATA_SEGS_IN = 152

BODY = re.compile(rb"worker (\d+) reused ([01]) proto (\S+)")


def make_context(tls):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    version = ssl.TLSVersion.TLSv1_2 if tls == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = version
    ctx.maximum_version = version
    if tls == "1.2":
        # Session ids only: a ticket would resume without the server's cache.
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


def data_segs_in(sock):
    """TCP segments with data received on `sock` so far, or -1 if the kernel does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return -1
    if len(info) < TCPI_DATA_SEGS_IN + 4:
        return -1
    return struct.unpack_from("=I", info, TCPI_DATA_SEGS_IN)[0]


def fetch(ctx, port, session, timeout, nagle, ask=True):
    """One connection: request "/", read the reply to EOF. Returns (reply, session, reused,
    TCP segments with data received). With ask=False: the handshake only, then close the
    socket with no request and no close_notify (as `openssl s_time` without -www does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        if not nagle:
            # As curl does. With Nagle on, a resumed TLS 1.2 handshake's request waits
            # behind the client's Finished until the server ACKs it (--nagle tests that the
            # server does not delay that ACK).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, session=session) as tls:
            if not ask:
                # close() sends no close_notify (only unwrap() would).
                return b"", tls.session, tls.session_reused, data_segs_in(tls)
            tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            chunks = []
            while True:
                data = tls.recv(4096)
                if not data:
                    break
                chunks.append(data)
            # Read after the reply: with TLS 1.3 the ticket arrived with it.
            return b"".join(chunks), tls.session, tls.session_reused, data_segs_in(tls)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls", choices=["1.2", "1.3"], required=True)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=5.0, help="per-connection socket timeout (s)")
    ap.add_argument("--pause-ms", type=float, default=0.0,
                    help="sleep before each reconnection (see tests/c_example.rs for why)")
    ap.add_argument("--nagle", action="store_true",
                    help="leave Nagle's algorithm on (no TCP_NODELAY), as many clients do")
    ap.add_argument("--no-request", action="store_true",
                    help="reconnections only shake hands and close, without close_notify "
                         "(TLS 1.2: the session is known at the handshake)")
    args = ap.parse_args()

    ctx = make_context(args.tls)
    reply, session, _, _ = fetch(ctx, args.port, None, args.timeout, args.nagle)
    m = BODY.search(reply)
    if m is None:
        print("first connection: unexpected reply %r" % reply, file=sys.stderr)
        return 1
    first_pid = int(m.group(1))

    resumed = 0
    body_reused = 0
    failures = 0
    pids = set()
    max_segs = -1
    times_ms = []
    for i in range(args.runs):
        if args.pause_ms > 0:
            time.sleep(args.pause_ms / 1000.0)
        try:
            start = time.monotonic()
            reply, new_session, reused, segs = fetch(ctx, args.port, session, args.timeout, args.nagle,
                                                     not args.no_request)
            took_ms = (time.monotonic() - start) * 1000.0
        except (OSError, ssl.SSLError) as e:
            print("run %d: %s" % (i, e), file=sys.stderr)
            failures += 1
            continue
        if args.no_request:
            resumed += 1 if reused else 0
            if new_session is not None:
                session = new_session
            continue
        m = BODY.search(reply)
        if m is None:
            print("run %d: unexpected reply %r" % (i, reply), file=sys.stderr)
            failures += 1
            continue
        if reused:
            resumed += 1
            pids.add(int(m.group(1)))
            max_segs = max(max_segs, segs)
            times_ms.append(took_ms)
        if m.group(2) == b"1":
            body_reused += 1
        if new_session is not None:
            session = new_session

    print(json.dumps({
        "tls": args.tls,
        "runs": args.runs,
        "resumed": resumed,
        "body_reused": body_reused,
        "first_pid": first_pid,
        "pids": sorted(pids),
        "failures": failures,
        "max_data_segs_in": max_segs,
        "median_ms": round(statistics.median(times_ms), 3) if times_ms else -1,
        "max_ms": round(max(times_ms), 3) if times_ms else -1,
    }))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
