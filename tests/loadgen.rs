//! The benchmarks' load generator (`examples/loadgen.rs`) measuring two real servers
//! interleaved: every slice reports both, each from its own turns, with its own sessions and
//! its own server CPU time.

mod common;
// The load generator itself, compiled into this test (its `main` unused), so the test never
// runs a stale build of the example.
#[allow(dead_code)]
#[path = "../examples/loadgen.rs"]
mod loadgen;

use common::Server;

/// The value of `"key":` in one JSON line of loadgen's (numbers and plain strings only).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let tag = format!("\"{key}\":");
    let at = line.find(&tag).unwrap_or_else(|| panic!("no {key} in {line}")) + tag.len();
    let rest = &line[at..];
    if let Some(s) = rest.strip_prefix('"') {
        &s[..s.find('"').expect("closing quote")]
    } else {
        &rest[..rest.find([',', '}']).expect("end of number")]
    }
}

fn num(line: &str, key: &str) -> f64 {
    field(line, key).parse().unwrap_or_else(|_| panic!("{key} is not a number in {line}"))
}

#[test]
fn interleaved_turns_measure_each_server_on_its_own() {
    let on = Server::start(&["--workers", "2", "--threads", "2", "--no-tickets"]);
    let off = Server::start(&["--workers", "2", "--threads", "2", "--no-tickets", "--no-share"]);
    let args = format!(
        "--target on={}:{} --target off={}:{} --clients 4 --warmup-ms 100 --duration-ms 300 --turn-ms 100 \
         --slices 2 --tls12",
        on.port, on.master, off.port, off.master
    );
    let args: Vec<String> = args.split_whitespace().map(String::from).collect();
    let lines = loadgen::run(loadgen::parse(&args));
    let stdout = lines.join("\n");
    assert_eq!(lines.len(), 4, "one line per slice and target: {stdout}");
    for slice in ["1", "2"] {
        for target in ["on", "off"] {
            let l = lines
                .iter()
                .find(|l| field(l, "slice") == slice && field(l, "target") == target)
                .unwrap_or_else(|| panic!("no slice {slice} of {target}: {stdout}"));
            assert_eq!(num(l, "turns"), 3.0, "300 ms of 100 ms turns: {l}");
            assert_eq!(num(l, "errors"), 0.0, "{l}");
            let (offered, resumed) = (num(l, "offered"), num(l, "resumed"));
            assert!(offered >= 12.0, "each client offers a session in each turn: {l}");
            // The sessions of one server are never offered to the other: with the store every
            // offer resumes, without it only those landing on the worker that made them.
            if target == "on" {
                assert_eq!(resumed, offered, "{l}");
            } else {
                assert!(resumed < 0.85 * offered, "two unshared workers resume about half: {l}");
            }
            assert!(num(l, "server_cpu_ms") > 0.0, "the server's CPU time over its turns: {l}");
            assert!(num(l, "resumed_per_s") > 0.0 && num(l, "duration_s") > 0.0, "{l}");
        }
    }
}
