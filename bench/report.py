#!/usr/bin/env python3
"""Folds the raw measurements of bench/run.sh into latest.md, latest.json and latest.svg.

    python3 bench/report.py --raw RAW.jsonl --out bench/results/latest [--meta k=v ...]

RAW.jsonl has one object per line: {"section": channel|handshakes|s_time|cost|codec|memory, ...,
"data": {...}}. Standard library only. Nothing is invented: a measurement that failed or
is missing is "error", a variant that was not run is "not run".
"""

import argparse
import json
import statistics
import sys

VARIANTS = ["on", "off", "pinned", "ideal", "nginx"]
VARIANT_NAMES = {
    "on": "store on",
    "off": "store off",
    "pinned": "store off, clients pinned",
    "ideal": "in-process ideal",
    "nginx": "nginx shared:SSL",
}
PROTOS = ["tls12", "tls13"]
PROTO_NAMES = {"tls12": "TLS 1.2 session ids", "tls13": "TLS 1.3 stateful"}
NOT_RUN = "not run"
ERROR = "error"
# A cell a variant has by design no measurement for (the pinned layout control at N=1, where
# it is the same server as "store off", and for full handshakes).
NOT_APPLICABLE = "—"


def stats(values):
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def fmt(x, digits=0, pct=False):
    if x is None:
        return ERROR
    if pct:
        return f"{x * 100:.{digits}f} %"
    return f"{x:,.{digits}f}"


def fmt_stats(s, digits=0, pct=False, reps=None):
    if s is None:
        return ERROR
    if isinstance(s, str):
        return s
    out = f"{fmt(s['median'], digits, pct)} [{fmt(s['min'], digits, pct)}–{fmt(s['max'], digits, pct)}]"
    if reps is not None and s["n"] < reps:
        out += f" ({s['n']}/{reps} reps)"
    return out


class Data:
    def __init__(self, raw_path, meta):
        self.meta = meta
        self.raw = []
        with open(raw_path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    self.raw.append(json.loads(line))
                except json.JSONDecodeError as e:
                    print(f"report.py: skipping bad line: {e}: {line[:120]}", file=sys.stderr)
        self.reps = int(meta.get("reps", "1"))
        self.reps_minor = int(meta.get("reps_minor", meta.get("reps", "1")))
        self.stime_reps = int(meta.get("stime_reps", meta.get("reps", "1")))
        self.stime_new_reps = int(meta.get("stime_new_reps", self.stime_reps))
        self.stime_tls12_reps = int(meta.get("stime_tls12_reps", self.stime_reps))
        self.with_nginx = meta.get("with_nginx") == "1"
        self.channel = {}
        self.channel_error = None
        self.memory = {}
        self.memory_error = None
        # proto -> the codec bench's line
        self.codec = {}
        self.codec_error = None
        # (variant, proto) -> {"ir": per connection, "syscalls": per connection, ...} or {"error": ...}
        self.cost = {}
        self.cost_error = None
        # (section, variant, n, proto, mode) -> {rep: data}
        self.runs = {}
        for r in self.raw:
            sec = r.get("section")
            if sec == "channel":
                if "error" in r:
                    self.channel_error = r["error"]
                    continue
                d = r.get("data", {})
                if d.get("kind") == "summary":
                    self.channel[(d["metric"], d["workers"])] = {
                        "min": d["min"],
                        "median": d["median"],
                        "max": d["max"],
                        "n": d.get("reps", 0),
                    }
            elif sec == "memory":
                if "error" in r:
                    self.memory_error = r["error"]
                    continue
                d = r.get("data", {})
                self.memory[d.get("sessions")] = d
            elif sec == "codec":
                if "error" in r:
                    self.codec_error = r["error"]
                    continue
                d = r.get("data", {})
                self.codec[d.get("proto")] = d
            elif sec == "cost":
                if "error" in r:
                    self.cost_error = r["error"]
                    continue
                self.cost[(r["variant"], r["proto"])] = cost_per_conn(r.get("data", {}))
            elif sec in ("handshakes", "s_time"):
                key = (sec, r["variant"], r["n"], r["proto"], r["mode"])
                d = r.get("data", {})
                cpu, conns = d.get("server_cpu_ms"), d.get("connections_total")
                if isinstance(cpu, (int, float)) and isinstance(conns, int) and conns > 0:
                    d["server_cpu_us_per_conn"] = cpu * 1000.0 / conns
                ccpu = d.get("client_cpu_ms")
                if isinstance(cpu, (int, float)) and isinstance(ccpu, (int, float)) and ccpu > 0:
                    d["server_per_client_cpu"] = cpu / ccpu
                self.runs.setdefault(key, {})[r["rep"]] = d

    def expected_reps(self, sec, n, mode, proto=None):
        if sec == "s_time":
            if mode == "new":
                return self.stime_new_reps
            return self.stime_tls12_reps if proto == "tls12" else self.stime_reps
        return self.reps if (mode == "resume" and n != 1) else self.reps_minor

    def ran(self, variant):
        return variant != "nginx" or self.with_nginx

    @staticmethod
    def applies(variant, n, mode):
        return variant != "pinned" or (n != 1 and mode == "resume")

    def per_rep(self, sec, variant, n, proto, mode, field):
        """rep -> value (None when that rep failed)."""
        out = {}
        for rep, d in self.runs.get((sec, variant, n, proto, mode), {}).items():
            v = d.get(field)
            ok = "error" not in d and isinstance(v, (int, float))
            if sec == "handshakes" and ok and not d.get("handshakes"):
                ok = False
            out[rep] = v if ok else None
        return out

    def value(self, sec, variant, n, proto, mode, field):
        if not self.ran(variant):
            return NOT_RUN
        if not self.applies(variant, n, mode):
            return NOT_APPLICABLE
        return stats(self.per_rep(sec, variant, n, proto, mode, field).values())

    def ratio(self, sec, a, b, n, proto, mode, field):
        """min/median/max over repetitions of a/b, paired by repetition."""
        if not (self.ran(a) and self.ran(b)):
            return NOT_RUN
        if not (self.applies(a, n, mode) and self.applies(b, n, mode)):
            return NOT_APPLICABLE
        pa = self.per_rep(sec, a, n, proto, mode, field)
        pb = self.per_rep(sec, b, n, proto, mode, field)
        vals = [pa[r] / pb[r] for r in pa if r in pb and pa[r] is not None and pb[r] and pb[r] > 0]
        return stats(vals)

    def ch(self, metric, w):
        if self.channel_error is not None:
            return None
        return self.channel.get((metric, w))


def cost_per_conn(d):
    """Two callgrind runs (a, b) of one server: the cost of one connection is the difference
    of their counts over the difference of their connections (the clients' first, full
    handshakes are in both and cancel out)."""
    if "error" in d:
        return {"error": d["error"]}
    try:
        (ca, cb), (ia, ib), (sa, sb) = d["connections"], d["ir"], d["syscalls"]
        rates = d.get("resumption_rate", [])
    except (KeyError, TypeError, ValueError):
        return {"error": "malformed"}
    if cb - ca <= 0 or ia <= 0 or ib <= 0:
        return {"error": f"no difference to divide by (connections {ca}, {cb})"}
    return {
        "ir": (ib - ia) / (cb - ca),
        "syscalls": (sb - sa) / (cb - ca),
        "connections": cb - ca,
        "resumption_rate": min(rates) if rates else None,
    }


def verdict(values, ok):
    """values: list of stats dicts / NOT_RUN / None. PASS when every median satisfies ok."""
    if any(v == NOT_RUN for v in values):
        return NOT_RUN
    if any(v is None for v in values):
        return ERROR
    return "PASS" if all(ok(v["median"]) for v in values) else "FAIL"


def build_targets(D):
    t = []
    # 1. cross-worker resumption
    on = [D.value("handshakes", "on", 4, p, "resume", "resumption_rate") for p in PROTOS]
    off = [D.value("handshakes", "off", 4, p, "resume", "resumption_rate") for p in PROTOS]
    t.append({
        "target": "cross-worker resumption, N=4, store on (TLS 1.2 / 1.3)",
        "threshold": "≥ 99.9 %",
        "measured": " / ".join(fmt_stats(v, 2, True) for v in on)
        + "; off: " + " / ".join(fmt_stats(v, 1, True) for v in off) + " (≈ 1/N)",
        "result": verdict(on, lambda x: x >= 0.999),
        "values": {"on": on, "off": off},
    })
    # 2. on vs ideal, 3. vs nginx (loadgen and s_time): one ratio per N = 2, 4 and protocol
    ratio_targets = (
        ("handshakes", "ideal", "resume", "resumed_per_s", "resumed handshakes/s, store on / ideal", 0.95),
        ("handshakes", "nginx", "resume", "resumed_per_s", "loadgen resumed/s, C example / nginx", 1.0),
        ("s_time", "nginx", "reuse", "connections_per_s", "s_time -reuse conn/s, C example / nginx", 1.0),
    )
    for section, other, mode, field, label, thr in ratio_targets:
        for p in PROTOS:
            rs = {n: D.ratio(section, "on", other, n, p, mode, field) for n in (2, 4)}
            t.append({
                "target": f"{label}, {PROTO_NAMES[p]}",
                "threshold": f"≥ {thr}",
                "measured": "; ".join(f"N={n}: {fmt_stats(r, 3)}" for n, r in rs.items()),
                "result": verdict(list(rs.values()), lambda x, thr=thr: x >= thr),
                "values": {str(n): r for n, r in rs.items()},
            })
    # 4. channel
    ws = (1, 2, 4)
    for metric, label, thr, ok in (
        ("ratio_get_p50_vs_echo_p50", "GET round trip p50 / echo p50", "≤ 1.5", lambda x: x <= 1.5),
        ("ratio_get_tput_vs_echo_tput", "GET/s round trip / echo/s", "≥ 0.7", lambda x: x >= 0.7),
    ):
        rs = {w: D.ch(metric, w) for w in ws}
        t.append({
            "target": f"{label} (channel bench, W=1/2/4)",
            "threshold": thr,
            "measured": "; ".join(f"W={w}: {fmt_stats(r, 2)}" for w, r in rs.items()),
            "result": verdict(list(rs.values()), ok),
            "values": {str(w): r for w, r in rs.items()},
        })
    # 5. memory
    mem = {}
    for s in (100000, 1000000):
        d = D.memory.get(s)
        v = d.get("rss_bytes_per_session") if d else None
        mem[s] = {"min": v, "median": v, "max": v, "n": 1} if isinstance(v, (int, float)) else None
    acc = {s: (D.memory.get(s) or {}).get("accounted_bytes_per_session") for s in (100000, 1000000)}
    t.append({
        "target": "master RSS bytes per cached 135-byte session (100k / 1M)",
        "threshold": "≤ 250",
        "measured": " / ".join(fmt(m["median"], 1) if m else ERROR for m in mem.values())
        + " (budget-accounted: " + " / ".join(fmt(a, 1) if isinstance(a, (int, float)) else ERROR for a in acc.values())
        + "; nginx ≈ 384)",
        "result": verdict(list(mem.values()), lambda x: x <= 250),
        "values": {str(k): v for k, v in mem.items()},
    })
    return t


def stime_server(m):
    """How the C example ran for s_time (bench/run.sh's STIME_LOOPS)."""
    loops = m.get('stime_loops', '?')
    if loops == 'default':
        return ("the C example as it starts without `--threads`: 4 accept loops per CPU in all, "
                "one loop of each worker at a time in accept4")
    return f"the C example with {loops} accept loop(s) per worker"


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def build_md(D, targets):
    m = D.meta
    L = []
    L.append("# cluster-tls-store benchmarks (issue 4)")
    L.append("")
    L.append(
        f"commit `{m.get('commit')}` · {m.get('date')} · nproc {m.get('nproc')} ({m.get('cpu')}) · "
        f"{m.get('openssl')} · kernel {m.get('kernel')} · nginx: {m.get('nginx')}"
    )
    L.append("")
    L.append(
        f"All variants' servers up at once (one set per N), measured interleaved by one load generator run: "
        f"turns of {m.get('turn_ms', '?')} ms, all clients against one server per turn, the servers taking turns "
        f"in an order that rotates every turn; a slice is {m.get('resume_ms')} ms of turns per variant for "
        f"resumed handshakes ({m.get('full_ms')} ms for full ones); {D.reps} slices at N=2 and 4, "
        f"{D.reps_minor} at N=1 and for full handshakes{' (--quick)' if m.get('quick') == '1' else ''}; "
        f"loadgen K={m.get('clients')} clients, one {m.get('warmup_ms')} ms warm-up turn per server first; s_time -reuse {m.get('s_time_s')} s, -new {m.get('s_time_new_s')} s "
        f"(one client: {stime_server(m)}), "
        f"{D.stime_reps} repetitions of TLS 1.3 -reuse, {D.stime_tls12_reps} of TLS 1.2 (-new: {D.stime_new_reps}); "
        f"channel bench `{m.get('channel_args')}`; servers with `--no-tickets` / `ssl_session_tickets off`; "
        f"C example: {m.get('loops', '?')} accept loops in all, split evenly over the workers (N=2: "
        f"{max(int(m.get('loops', '0')) // 2, 1)} each, N=4: {max(int(m.get('loops', '0')) // 4, 1)}), on one listening socket inherited by every worker, "
        f"one loop of each worker at a time blocked in accept4 on it (the kernel hands a connection to the worker whose loop waited longest); "
        f"nginx likewise (its default `listen`, no `reuseport`); the ideal: one process with "
        f"{m.get('ideal_loops', m.get('loops', '?'))} loops, its best (fewer loops than clients keep one process's loops busy). "
        f"Store off, clients pinned: the C example with `--no-share --sticky` (a SO_REUSEPORT socket per worker) and the same loops, each client "
        f"(loadgen `--source-addrs`: its own loopback address, for every variant) steered to one worker, so "
        f"OpenSSL's per-process cache resumes everything with no store: store on's processes and loops, each client kept to one worker. "
        f"Cells: median [min–max] over slices; ratios are paired per slice (the same stretch of time). "
        f"Wall time {float(m.get('wall_s', 'nan')):.0f} s."
    )
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append(md_table(["target", "threshold", "measured median [min–max]", "result"],
                      [[t["target"], t["threshold"], t["measured"], f"**{t['result']}**"] for t in targets]))
    L.append("")

    # handshakes
    L.append("## Handshakes (C example prefork server, loadgen)")
    for mode, field, title in (("resume", "resumed_per_s", "resumed handshakes/s"),
                               ("full", "handshakes_per_s", "full handshakes/s (reference)")):
        for p in PROTOS:
            L.append("")
            L.append(f"### {PROTO_NAMES[p]}: {title}")
            L.append("")
            hdr = ["N"] + [VARIANT_NAMES[v] for v in VARIANTS] + ["on / ideal", "on / off", "on / nginx",
                                                                  "on / pinned", "pinned / ideal"]
            rows = []
            for n in (1, 2, 4):
                row = [n]
                for v in VARIANTS:
                    row.append(fmt_stats(D.value("handshakes", v, n, p, mode, field), 0,
                                         reps=D.expected_reps("handshakes", n, mode)))
                for a, b in (("on", "ideal"), ("on", "off"), ("on", "nginx"), ("on", "pinned"), ("pinned", "ideal")):
                    row.append(fmt_stats(D.ratio("handshakes", a, b, n, p, mode, field), 3))
                rows.append(row)
            L.append(md_table(hdr, rows))
            if mode == "resume":
                L.append("")
                L.append("Resumption rate (resumed / offered):")
                L.append("")
                rows = []
                for n in (1, 2, 4):
                    rows.append([n] + [fmt_stats(D.value("handshakes", v, n, p, mode, "resumption_rate"), 2, True)
                                       for v in VARIANTS])
                L.append(md_table(["N"] + [VARIANT_NAMES[v] for v in VARIANTS], rows))
                cpu_tables = (
                    ("server_cpu_us_per_conn", 1,
                     "Server CPU per connection, µs (every process of the server, from /proc schedstat; "
                     "less sensitive to other tenants than a rate):"),
                    ("server_per_client_cpu", 3,
                     "Server CPU / client CPU over the same slice (the load generator does the same work against "
                     "every server, so its CPU time is a yardstick for the machine's speed of the moment; this "
                     "ratio moves least with other tenants):"),
                )
                for cf, digits, caption in cpu_tables:
                    L.append("")
                    L.append(caption)
                    L.append("")
                    rows = []
                    for n in (1, 2, 4):
                        rows.append([n] + [fmt_stats(D.value("handshakes", v, n, p, mode, cf), digits) for v in VARIANTS]
                                    + [fmt_stats(D.ratio("handshakes", a, b, n, p, mode, cf), 3)
                                       for a, b in (("on", "ideal"), ("on", "nginx"), ("on", "pinned"),
                                                    ("pinned", "ideal"))])
                    L.append(md_table(["N"] + [VARIANT_NAMES[v] for v in VARIANTS]
                                      + ["on / ideal", "on / nginx", "on / pinned", "pinned / ideal"], rows))
    errs = []
    for (sec, v, n, p, mode), reps in sorted(D.runs.items(), key=str):
        for rep, d in sorted(reps.items()):
            if d.get("errors"):
                errs.append(f"{sec} {v} N={n} {p} {mode} rep {rep}: {d['errors']} errors ({d.get('last_error', '')})")
            if "error" in d:
                errs.append(f"{sec} {v} N={n} {p} {mode} rep {rep}: {d['error']}")
    L.append("")
    L.append("## openssl s_time (one client, `-www /`, connections/s = connections / the client's wall time)")
    L.append("")
    rows = []
    for mode in ("reuse", "new"):
        for p in PROTOS:
            for n in (2, 4):
                rows.append([f"-{mode}", PROTO_NAMES[p], n,
                             fmt_stats(D.value("s_time", "on", n, p, mode, "connections_per_s"), 0,
                                       reps=D.expected_reps("s_time", n, mode, p)),
                             fmt_stats(D.value("s_time", "nginx", n, p, mode, "connections_per_s"), 0,
                                       reps=D.expected_reps("s_time", n, mode, p)),
                             fmt_stats(D.ratio("s_time", "on", "nginx", n, p, mode, "connections_per_s"), 3)])
    L.append(md_table(["mode", "protocol", "N", "C example, store on", "nginx", "C / nginx"], rows))
    L.append("")
    L.append("## Channel (benches/channel.rs summaries)")
    L.append("")
    if D.channel_error is not None:
        L.append(f"error: {D.channel_error}")
    else:
        rows = []
        for metric, label, dg in (
            ("get_p50_us", "GET round trip p50 (µs)", 1), ("get_p99_us", "GET round trip p99 (µs)", 1),
            ("echo_p50_us", "echo p50 (µs)", 1), ("echo_p99_us", "echo p99 (µs)", 1),
            ("replica_p50_us", "GET replica p50 (µs)", 2), ("hash_p50_us", "hash p50 (µs)", 3),
            ("get_ops_per_s", "GET/s round trip", 0), ("echo_ops_per_s", "echo/s", 0),
            ("replica_ops_per_s", "GET/s replica", 0), ("hash_ops_per_s", "hash/s", 0),
            ("put_send_per_s", "PUT sent/s", 0), ("put_stored_per_s", "PUT stored/s (master)", 0),
            ("put_rt_p50_us", "PUT round trip p50 (µs)", 1), ("put_rt_p99_us", "PUT round trip p99 (µs)", 1),
            ("put_rt_ops_per_s", "PUT round trips/s", 0),
            ("ratio_get_p50_vs_echo_p50", "GET p50 / echo p50", 3),
            ("ratio_get_tput_vs_echo_tput", "GET/s / echo/s", 3),
        ):
            rows.append([label] + [fmt_stats(D.ch(metric, w), dg) for w in (1, 2, 4)])
        L.append(md_table(["metric", "W=1", "W=2", "W=4"], rows))
    L.append("")
    L.append("## Cost per resumed connection, counted (callgrind)")
    L.append("")
    L.append(
        "Each server (N=2; the ideal: one process) under `valgrind --tool=callgrind --trace-children=yes "
        "--collect-systime=yes`, every process counted (workers and master). Two loadgen runs after a warm-up, "
        "counters zeroed before each and dumped after; (run b − run a) / (connections b − connections a) is "
        "one resumed connection, with the clients' first handshakes cancelled out. Instructions (user space: "
        "libssl, libcrypto, libc, this library, the server) and system calls do not depend on what else runs "
        "on the machine; the kernel's work inside the calls is not counted."
    )
    L.append("")
    if D.cost_error is not None:
        L.append(f"not run: {D.cost_error}")
    else:
        def cell(v, p, k, dg):
            c = D.cost.get((v, p))
            if not D.ran(v):
                return NOT_RUN
            if c is None or "error" in c:
                return ERROR if c is None else f"error: {c['error']}"
            return fmt(c[k], dg)

        def rat(a, b, p, k):
            ca, cb = D.cost.get((a, p)), D.cost.get((b, p))
            if not (D.ran(a) and D.ran(b)):
                return NOT_RUN
            if not ca or not cb or "error" in ca or "error" in cb or not cb[k]:
                return ERROR
            return f"{ca[k] / cb[k]:.3f}"

        rows = []
        for p in PROTOS:
            for k, label, dg in (("ir", "instructions / connection", 0), ("syscalls", "system calls / connection", 1)):
                rows.append([PROTO_NAMES[p], label] + [cell(v, p, k, dg) for v in ("on", "ideal", "nginx")]
                            + [rat("on", "ideal", p, k), rat("on", "nginx", p, k)])
        L.append(md_table(["protocol", "per resumed connection", "store on (N=2)", "in-process ideal", "nginx (N=2)",
                           "on / ideal", "on / nginx"], rows))
        low = [f"{v} {PROTO_NAMES[p]}: {c['resumption_rate'] * 100:.1f} %" for (v, p), c in sorted(D.cost.items())
               if "error" not in c and c.get("resumption_rate") is not None and c["resumption_rate"] < 0.999]
        if low:
            L.append("")
            L.append("Resumption rate below 99.9 % in a counted run (its full handshakes inflate the cost): "
                     + "; ".join(low))
    L.append("")
    L.append("## What a shared cache adds per session: OpenSSL's encode and decode (benches/codec.rs)")
    L.append("")
    L.append(
        "OpenSSL's own cache keeps the `SSL_SESSION` object; a cache shared between processes keeps bytes, so each "
        "new session is encoded (`i2d_SSL_SESSION` for its length, then for its bytes, as the store's callback and "
        "nginx's do) and each hit decoded (`d2i_SSL_SESSION`; the copy is freed when its connection ends). Real "
        "server-side sessions from real resumed handshakes on loopback, timed right after each handshake (the "
        "caches as a worker's are when its callbacks run), beside the server thread's CPU time for the handshake "
        "itself; \"hot\": one session in a tight loop. A TLS 1.3 resumption makes a new session (its ticket), so it "
        "pays all three; a TLS 1.2 resumption only the decode and free (the store also keeps TLS 1.2 sessions "
        "decoded in the worker that has one). µs, p50 (p90)."
    )
    L.append("")
    if D.codec_error is not None:
        L.append(f"error: {D.codec_error}")
    elif not D.codec:
        L.append(ERROR)
    else:
        rows = []
        for p in PROTOS:
            d = D.codec.get(p)
            if d is None:
                rows.append([PROTO_NAMES[p]] + [ERROR] * 7)
                continue
            pair = lambda k, dg=2: f"{fmt(d.get(k + '_p50'), dg)} ({fmt(d.get(k + '_p90'), dg)})"
            rows.append([
                PROTO_NAMES[p], fmt(d.get("der_bytes")), pair("handshake_cpu_us", 1), pair("encode_us"),
                pair("decode_us"), pair("free_us"),
                f"{fmt(d.get('codec_us_p50'), 2)} ({fmt((d.get('codec_share_of_handshake') or 0) * 100, 1)} %)",
                f"{fmt(d.get('hot_encode_us'), 2)} / {fmt(d.get('hot_decode_us'), 2)} / {fmt(d.get('hot_free_us'), 2)}",
            ])
        L.append(md_table(["protocol", "DER bytes", "resumed handshake, server CPU", "encode", "decode", "free",
                           "per resumed connection (share of the handshake)", "hot: encode / decode / free"], rows))
    L.append("")
    L.append("## Memory (benches/memory.rs)")
    L.append("")
    if D.memory_error is not None:
        L.append(f"error: {D.memory_error}")
    else:
        rows = []
        for s in (100000, 1000000):
            d = D.memory.get(s)
            if d is None:
                rows.append([f"{s:,}", ERROR, ERROR, "≈ 384"])
            else:
                rows.append([f"{s:,}", fmt(d.get("rss_bytes_per_session"), 1),
                             fmt(d.get("accounted_bytes_per_session"), 1), "≈ 384"])
        L.append(md_table(["sessions", "RSS bytes/session", "budget-accounted bytes/session", "nginx"], rows))
    if errs:
        L.append("")
        L.append("## Client errors")
        L.append("")
        for e in errs[:40]:
            L.append(f"- {e}")
        if len(errs) > 40:
            L.append(f"- ... {len(errs) - 40} more in latest.json")
    L.append("")
    return "\n".join(L)


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def build_svg(D):
    colors = {"on": "#1f77b4", "off": "#aec7e8", "pinned": "#9467bd", "ideal": "#2ca02c", "nginx": "#ff7f0e"}
    panels = [("resume", "resumed_per_s", "Resumed handshakes/s (K=%s clients)" % D.meta.get("clients")),
              ("full", "handshakes_per_s", "Full handshakes/s (reference)")]
    groups = [(p, n) for p in PROTOS for n in (1, 2, 4)]
    bw, gap, left, pw = 26, 34, 70, 0
    gw = bw * len(VARIANTS) + gap
    pw = left + gw * len(groups) + 20
    ph = 300
    H = 60 + ph * len(panels) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{pw}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{pw}" height="{H}" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">cluster-tls-store handshakes '
           f'(commit {esc(D.meta.get("commit"))}, {D.reps} reps, median; whiskers min–max)</text>']
    lx = 10
    for v in VARIANTS:
        out.append(f'<rect x="{lx}" y="32" width="12" height="12" fill="{colors[v]}"/>')
        label = VARIANT_NAMES[v] + ("" if D.ran(v) else " (not run)")
        out.append(f'<text x="{lx + 16}" y="42">{esc(label)}</text>')
        lx += 16 + 7 * len(label) + 20
    for pi, (mode, field, title) in enumerate(panels):
        top = 60 + pi * ph
        base = top + ph - 80
        height = ph - 120
        vals = []
        for p, n in groups:
            for v in VARIANTS:
                s = D.value("handshakes", v, n, p, mode, field)
                if isinstance(s, dict):
                    vals.append(s["max"])
        vmax = max(vals) if vals else 1.0
        vmax = vmax * 1.1 or 1.0
        out.append(f'<text x="10" y="{top + 16}" font-size="13" font-weight="bold">{esc(title)}</text>')
        out.append(f'<line x1="{left - 5}" y1="{base}" x2="{pw - 10}" y2="{base}" stroke="black"/>')
        for k in range(5):
            y = base - height * k / 4
            out.append(f'<line x1="{left - 5}" y1="{y:.1f}" x2="{pw - 10}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{vmax * k / 4:,.0f}</text>')
        for gi, (p, n) in enumerate(groups):
            gx = left + gi * gw
            for vi, v in enumerate(VARIANTS):
                x = gx + vi * bw
                s = D.value("handshakes", v, n, p, mode, field)
                if isinstance(s, dict):
                    h = height * s["median"] / vmax
                    out.append(f'<rect x="{x}" y="{base - h:.1f}" width="{bw - 3}" height="{h:.1f}" fill="{colors[v]}">'
                               f'<title>{esc(VARIANT_NAMES[v])} {PROTO_NAMES[p]} N={n}: {s["median"]:.0f}/s</title></rect>')
                    y1, y2 = base - height * s["min"] / vmax, base - height * s["max"] / vmax
                    cx = x + (bw - 3) / 2
                    out.append(f'<line x1="{cx}" y1="{y1:.1f}" x2="{cx}" y2="{y2:.1f}" stroke="black"/>')
                    out.append(f'<text x="{cx}" y="{y2 - 4:.1f}" text-anchor="middle" font-size="9" '
                               f'transform="rotate(-90 {cx} {y2 - 4:.1f})" dx="14" dy="3">{s["median"]:.0f}</text>')
                elif s != NOT_APPLICABLE:
                    txt = "not run" if s == NOT_RUN else "error"
                    out.append(f'<text x="{x + 10}" y="{base - 4}" font-size="9" '
                               f'transform="rotate(-90 {x + 10} {base - 4})">{txt}</text>')
            out.append(f'<text x="{gx + gw / 2 - gap / 2}" y="{base + 14}" text-anchor="middle">'
                       f'{"TLS1.2" if p == "tls12" else "TLS1.3"} N={n}</text>')
            for ri, b in enumerate(("ideal", "nginx")):
                r = D.ratio("handshakes", "on", b, n, p, mode, field)
                txt = f"on/{b} {r['median']:.2f}" if isinstance(r, dict) else f"on/{b} {r if r == NOT_RUN else 'error'}"
                out.append(f'<text x="{gx + gw / 2 - gap / 2}" y="{base + 28 + 12 * ri}" text-anchor="middle" '
                           f'font-size="10">{esc(txt)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.md, PREFIX.json, PREFIX.svg")
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()
    meta = dict(kv.split("=", 1) for kv in a.meta if "=" in kv)
    D = Data(a.raw, meta)
    targets = build_targets(D)
    md = build_md(D, targets)
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    summary = {"handshakes": [], "s_time": []}
    for sec, modes, fields in (("handshakes", ("resume", "full"), ("handshakes_per_s", "resumed_per_s", "resumption_rate")),
                               ("s_time", ("reuse", "new"), ("connections_per_s",))):
        for mode in modes:
            for p in PROTOS:
                for n in (1, 2, 4):
                    for v in VARIANTS:
                        if not any(k[:5] == (sec, v, n, p, mode) for k in D.runs) and D.ran(v):
                            continue
                        if not D.applies(v, n, mode):
                            continue
                        row = {"variant": v, "n": n, "proto": p, "mode": mode}
                        for fld in fields:
                            row[fld] = D.value(sec, v, n, p, mode, fld) if D.ran(v) else NOT_RUN
                        summary[sec].append(row)
    doc = {
        "meta": meta,
        "targets": [{k: t[k] for k in ("target", "threshold", "measured", "result", "values")} for t in targets],
        "summary": summary,
        "channel": [{"metric": k[0], "workers": k[1], **v} for k, v in sorted(D.channel.items())],
        "channel_error": D.channel_error,
        "memory": [D.memory[k] for k in sorted(D.memory)],
        "memory_error": D.memory_error,
        "raw": D.raw,
    }
    with open(a.out + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(a.out + ".svg", "w", encoding="utf-8") as f:
        f.write(build_svg(D))


if __name__ == "__main__":
    main()
