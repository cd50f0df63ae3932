#!/usr/bin/env python3
"""Forged-record client for tests/c_example.rs, using only the standard library.

TLS 1.2 with session ids. Makes a session, resumes it once (it must resume), resumes it again
and then writes a forged application-data record straight onto the socket, under the TLS
layer (the server must answer with a fatal alert), then offers the session once more after
a pause. Prints one JSON line:

  {"resumed_before": true, "forged_resumed": true, "alert": "...", "resumed_after": false}

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
            if forge:
                # A record the server cannot authenticate: header (application data, TLS 1.2,
                # 48 bytes) and random bytes, written under the TLS layer.
                os.write(tls.fileno(), b"\x17\x03\x03\x00\x30" + os.urandom(0x30))
            else:
                tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            try:
                while tls.recv(4096):
                    pass
            except (ssl.SSLError, OSError) as e:
                alert = str(e)
            return new_session, reused, alert

    session, _, _ = connect(None)
    _, resumed_before, _ = connect(session)
    _, forged_resumed, alert = connect(session, forge=True)
    time.sleep(args.pause_ms / 1000.0)
    _, resumed_after, _ = connect(session)
    print(json.dumps({
        "resumed_before": resumed_before,
        "forged_resumed": forged_resumed,
        "alert": alert,
        "resumed_after": resumed_after,
    }))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
