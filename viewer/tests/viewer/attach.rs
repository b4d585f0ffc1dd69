//! `--attach`: the reader of a server's telemetry stream, against a small
//! SSE server on the loopback that sends a fixture trace the way `pagoda
//! serve`'s `/v1/telemetry` does (one `data:` line per event, keep-alive
//! comments), then ends the stream. What the viewer holds afterwards must
//! be the trace's last state, and the status must say the stream ended.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use pagoda_viewer::source::attach::{Attach, AttachStatus};
use pagoda_viewer::source::replay::Replay;
use pagoda_viewer::timeline::Timeline;

use crate::common::{MACHINE, traces};

#[test]
fn an_attached_stream_rebuilds_the_servers_state() {
    let _g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    let path = traces()[0].clone();
    let body = std::fs::read_to_string(&path).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        // One connection: read the request, answer with the whole trace.
        let (mut s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut request = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
            request.push_str(&line);
        }
        assert!(request.starts_with("GET /v1/telemetry "), "{request}");
        write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        for (i, line) in body.lines().enumerate() {
            if i % 40 == 0 {
                write!(s, ": keep-alive\n\n").unwrap();
            }
            write!(s, "data: {line}\n\n").unwrap();
        }
        s.flush().unwrap();
    });
    let a = Attach::start(&format!("http://{addr}"), None, || {}).unwrap();
    let mut tl = Timeline::default();
    let t0 = Instant::now();
    let want = Replay::open(&path).unwrap();
    let last = *want.frames().last().unwrap();
    while tl.state_step() != last.step_id || tl.state().is_none() {
        for ev in a.drain() {
            tl.push(&ev);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "status {:?}",
            a.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.join().unwrap();
    let expect = want.trace().memory_at(last.step_id).unwrap().unwrap();
    assert_eq!(tl.state(), Some(&expect));
    assert!(!tl.is_stale());
    assert_eq!(tl.memory_history().len(), want.frames().len());
    // The server hung up: said so (then it retries).
    let t1 = Instant::now();
    while !matches!(a.status(), AttachStatus::Failed(_)) {
        assert!(t1.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
}
