#!/usr/bin/env python3
"""Forged-record client for tests/c_example.rs, using only the standard library.

TLS 1.2 with session ids. Makes a session, resumes it once (it must resume), resumes it again
and then writes a forged application-data record straight onto the socket, under the TLS
layer (the server must answer with a fatal alert), then, after a pause, offers the session
on --after connections, which land on random workers. Prints one JSON line:

  {"resumed_before": true, "forged_resumed": true, "alert": "...", "resumed_after": false,
   "after_workers": 3}

(`resumed_after`: whether any of those connections resumed; `after_workers`: how many distinct
workers answered them, so that the check reached workers other than the forged connection's.)

The server keeps the session of a connection that merely ends without close_notify, but a
fatal alert must still remove it, from every worker.
"""

import argparse
import json
import os
import socket
import ssl
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pause-ms", type=float, default=100.0,
                    help="wait after the forged connection, for its removal to reach the master")
    ap.add_argument("--after", type=int, default=8,
                    help="connections offering the session after the forged one")
    args = ap.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET

    def connect(session, forge=False):
        raw = socket.create_connection(("127.0.0.1", args.port), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, session=session) as tls:
            reused = tls.session_reused
            new_session = tls.session
            alert = ""
            body = b""
            if forge:
                # A record the server cannot authenticate: header (application data, TLS 1.2,
                # 48 bytes) and random bytes, written under the TLS layer.
                os.write(tls.fileno(), b"\x17\x03\x03\x00\x30" + os.urandom(0x30))
            else:
                tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            try:
                while True:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    body += chunk
            except (ssl.SSLError, OSError) as e:
                alert = str(e)
            # The reply's body: "worker <pid> reused <0|1> proto <v>".
            words = body.split(b"\r\n\r\n", 1)[-1].split()
            worker = words[1].decode() if len(words) > 1 and words[0] == b"worker" else None
            return new_session, reused, alert, worker

    session, _, _, _ = connect(None)
    _, resumed_before, _, _ = connect(session)
    _, forged_resumed, alert, _ = connect(session, forge=True)
    time.sleep(args.pause_ms / 1000.0)
    resumed_after = False
    after_workers = set()
    for _ in range(args.after):
        _, reused, _, worker = connect(session)
        resumed_after = resumed_after or reused
        if worker is not None:
            after_workers.add(worker)
    print(json.dumps({
        "resumed_before": resumed_before,
        "forged_resumed": forged_resumed,
        "alert": alert,
        "resumed_after": resumed_after,
        "after_workers": len(after_workers),
    }))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
