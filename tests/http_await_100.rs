//! `http.request` with `Expect: 100-continue` against an upstream whose
//! `100 Continue` arrives in two pieces, 600 ms apart (SPEC §12.15): the
//! worker must wait for the rest in a blocking read, not spin on the half
//! it has (ureq's loop returns at once on a partial interim answer unless
//! the block consumes it; that busy loop burnt a core for up to a second).
//!
//! Alone in its file: the check reads the CPU time of this process's
//! finished children, so no other test's worker may run meanwhile.
mod support;

use serde_json::json;
use std::io::{BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

/// The pause inside the `100 Continue`: under the block's 1 s wait for it.
const PAUSE: Duration = Duration::from_millis(600);

/// CPU seconds (user + system) of this process's children that ended and
/// were waited for (`cutime` + `cstime` in `/proc/self/stat`).
fn children_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (in parentheses, may hold spaces):
    // state is field 3, so cutime (16) and cstime (17) are at 13 and 14.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[13].parse::<f64>().expect("cutime") + fields[14].parse::<f64>().expect("cstime");
    // Clock ticks: 100 a second on Linux (USER_HZ) whatever the kernel's HZ.
    ticks / 100.0
}

#[test]
fn a_100_continue_in_two_pieces_is_awaited_without_spinning() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/up", listener.local_addr().expect("addr"));
    let upstream = std::thread::spawn(move || -> Vec<u8> {
        let (stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        // First a plain GET, so that the POST runs on a pooled connection:
        // the partial-answer spin needs the buffer's progress flag left
        // set by the previous response (a fresh connection starts clear).
        support::read_head_and_length(&mut reader).expect("the GET");
        writer
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .expect("first answer");
        let (_, length) = support::read_head_and_length(&mut reader).expect("the POST");
        writer.write_all(b"HTTP/1.1 100").expect("first piece");
        writer.flush().expect("flush");
        std::thread::sleep(PAUSE);
        writer
            .write_all(b" Continue\r\n\r\n")
            .expect("second piece");
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
        writer
            .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
            .expect("answer");
        body
    });
    let get = support::assignment("g-1", "http.request", json!({ "url": url }));
    let post = support::assignment(
        "c-1",
        "http.request",
        json!({"url": url, "method": "POST", "body": "payload",
               "headers": {"Expect": "100-continue"}}),
    );
    // The window holds the worker alone (the result checker, a Python
    // process, runs after it).
    let before = children_cpu_s();
    let out = support::run_lines(
        &[get, post],
        &[("WORKER_IO_POOL_SIZE", "1")],
        Duration::from_secs(20),
    );
    let cpu = children_cpu_s() - before;
    support::check_results(&out.stdout);
    let results = out.json_lines();
    assert_eq!(results.len(), 2, "{:?} {:?}", out.stdout, out.stderr);
    assert_eq!(results[0]["outputs"]["body"], "ok", "{}", results[0]);
    assert_eq!(results[1]["status"], "success", "{}", results[1]);
    assert_eq!(results[1]["outputs"]["status_code"], 201, "{}", results[1]);
    assert_eq!(results[1]["outputs"]["body"], "done", "{}", results[1]);
    assert_eq!(upstream.join().expect("upstream"), b"payload");
    // A worker that waits uses a few ms for its start, two steps and its
    // exit (measured: 0.00–0.01 s); one that spins burns the pause and
    // more (1.1 s, until its 1 s wait for the `100` gives up).
    assert!(
        cpu < 0.3,
        "the worker used {cpu:.2} s of CPU over a {PAUSE:?} wait"
    );
}
