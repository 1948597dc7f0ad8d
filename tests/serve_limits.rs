//! `lab serve` under abuse of its front door: floods of big prompts, idle and half-sent
//! connections, more sockets than file descriptors. Real HTTP on loopback, tiny model.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::serve_util::*;

const BASE: &str = "synthetic:tiny";

/// Time of one `GET /health` on a fresh connection, and its status.
fn health(s: &Server) -> (Duration, u16) {
    let t0 = Instant::now();
    let status = client().get(format!("{}/health", s.url)).send().map(|r| r.status().as_u16()).unwrap_or(0);
    (t0.elapsed(), status)
}

/// While clients keep sending prompts of ~4 MB (tokenizing one takes about a second),
/// `/health` and `/metrics` answer promptly: rendering and tokenization run off the async
/// workers (before, two such prompts held both workers and `/health` waited seconds); and a
/// small request queued behind the flood has that wait in its TTFT.
#[test]
fn health_and_metrics_answer_during_a_flood_of_big_prompts() {
    let s = &Server::tiny(&[]);
    let big = "hello world, ".repeat(300_000);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for i in 0..6 {
            let (big, stop) = (&big, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (path, body) = if i % 2 == 0 {
                        ("/v1/chat/completions", chat_body(BASE, big, 1))
                    } else {
                        ("/v1/completions", json!({"model": BASE, "prompt": big, "max_tokens": 1}))
                    };
                    let (status, v) = s.post(path, &body);
                    assert_eq!(status, 400, "longer than --max-model-len: {v}");
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500)); // the flood is under way
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let (took, status) = health(s);
            assert_eq!(status, 200);
            worst = worst.max(took);
            let t0 = Instant::now();
            assert!(s.get_text("/metrics").contains("vllm:num_requests_running"));
            worst = worst.max(t0.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("worst health/metrics latency during the flood: {worst:?}");
        // A small request waits its turn for tokenization behind the flood; the server's
        // TTFT for it must include that wait (it started after it: a few ms, while the client
        // waited a second or more). Flood requests fail validation, so they record no TTFT.
        let ttft_before = s.metric("vllm:time_to_first_token_seconds_sum");
        let t0 = Instant::now();
        assert_eq!(s.chat(BASE, "small", 1).1, "length");
        let client_s = t0.elapsed().as_secs_f64();
        let server_s = s.metric("vllm:time_to_first_token_seconds_sum") - ttft_before;
        stop.store(true, Ordering::Relaxed);
        assert!(worst < Duration::from_millis(400), "/health or /metrics took {worst:?} during the flood");
        assert!(client_s > 0.3, "the small request should have queued behind the flood ({client_s} s)");
        assert!(server_s > 0.5 * client_s, "server TTFT {server_s} s for a request the client waited {client_s} s for");
    });
}

/// Seconds until the server closes `sock` (a read returns EOF or an error), at most `limit`.
fn closed_after(sock: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match sock.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

fn connect(s: &Server) -> TcpStream {
    TcpStream::connect(s.url.trim_start_matches("http://")).unwrap()
}

/// An idle connection is closed after `--idle-timeout`, a request whose headers trickle in
/// after `--header-timeout`, a half-sent body gets a 400 naming the timeout; a request in
/// flight longer than both is not cut (before: all of them were held for ever).
#[test]
fn idle_and_half_sent_connections_are_closed_after_their_timeouts() {
    // One running sequence, so of four long requests the last waits silently for seconds.
    let s = &Server::tiny(&["--header-timeout", "1", "--idle-timeout", "2", "--max-num-seqs", "1"]);
    std::thread::scope(|scope| {
        let idle = scope.spawn(|| closed_after(&mut connect(s), Duration::from_secs(10)));
        let trickle = scope.spawn(|| {
            let mut sock = connect(s);
            sock.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").unwrap();
            let t0 = Instant::now();
            // One header byte every 200 ms: never idle, never complete.
            while sock.write_all(b"x").is_ok() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(200));
            }
            t0.elapsed()
        });
        let body = scope.spawn(|| {
            let mut sock = connect(s);
            let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
            sock.write_all(head.as_bytes()).unwrap();
            sock.write_all(b"{\"model\":").unwrap();
            let t0 = Instant::now();
            sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reply = String::new();
            let _ = sock.read_to_string(&mut reply);
            (t0.elapsed(), reply)
        });
        // Non-streamed requests that queue and generate for longer than both timeouts, silent
        // meanwhile (8 in a row on one running slot: ~6 s here, > 2 s on a 3x faster machine).
        let t0 = Instant::now();
        let longs: Vec<_> =
            (0..8).map(|i| scope.spawn(move || s.chat(BASE, &format!("long answer {i}"), 1800))).collect();
        for h in longs {
            assert_eq!(h.join().unwrap().1, "length");
        }
        let long = t0.elapsed();
        let idle = idle.join().unwrap().expect("an idle connection is closed");
        assert!(idle >= Duration::from_millis(1500) && idle < Duration::from_secs(5), "idle closed after {idle:?}");
        let trickle = trickle.join().unwrap();
        assert!(trickle < Duration::from_secs(4), "a trickled head was held {trickle:?}");
        let (took, reply) = body.join().unwrap();
        assert!(took < Duration::from_secs(4), "a half-sent body was held {took:?}");
        assert!(reply.starts_with("HTTP/1.1 400") && reply.contains("--header-timeout"), "{reply}");
        assert!(
            long > Duration::from_secs(2),
            "the long request ({long:?}) must outlast the timeouts to prove anything"
        );
    });
}

/// With the soft fd limit at 256 (as a low default would be) and 400 idle sockets open,
/// `/health` still answers: the server raised its soft limit to the hard one at start-up
/// (before, every accept failed with EMFILE and nothing answered).
#[test]
fn more_idle_sockets_than_the_inherited_soft_fd_limit_do_not_lock_out_health() {
    let s = Server::start_after(
        "ulimit -Sn 256",
        &["serve", "--model", "synthetic:tiny", "--port", "0", "--kv-cache-memory", "64MiB"],
    );
    let idle: Vec<TcpStream> = (0..400).map(|_| connect(&s)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let quick = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let status = quick.get(format!("{}/health", s.url)).send().map(|r| r.status().as_u16());
    assert_eq!(status.ok(), Some(200), "log: {:?}", s.log.lock().unwrap());
    assert_eq!(s.chat(BASE, "still serving", 4).1, "length");
    drop(idle);
}

/// Past `--max-connections` a new connection gets a 503 with Retry-After at once and the log
/// says so; once idle connections time out, `/health` answers 200 again.
#[test]
fn the_connection_cap_answers_503_at_once_and_logs_it() {
    let s = Server::tiny(&["--max-connections", "8", "--idle-timeout", "2"]);
    let idle: Vec<TcpStream> = (0..8).map(|_| connect(&s)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let resp = client().get(format!("{}/health", s.url)).send().unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: serde_json::Value = resp.json().unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("--max-connections"), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(1), "refused in {:?}", t0.elapsed());
    assert!(wait_until(5, || s.log.lock().unwrap().iter().any(|l| l.contains("connection cap reached"))));
    assert!(wait_until(6, || health(&s).1 == 200), "the idle connections timed out and freed the cap");
    drop(idle);
}

/// `--max-waiting-per-model 3`: while one slot is busy, a burst of 12 requests for the base
/// takes at most 3 waiting places (the rest get 429 + Retry-After) and a request for another
/// model is still accepted (without the share, the burst filled `--max-waiting 8` and every
/// other tenant got 503 until it drained).
#[test]
fn one_models_burst_cannot_take_every_waiting_place() {
    let dir = temp_dir("limits-per-model");
    let good = tiny_adapter(&dir.join("good"), 4);
    let s = &Server::tiny(&[
        "--lora-modules",
        &format!("good={}", good.display()),
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "8",
        "--max-waiting-per-model",
        "3",
    ]);
    let mut long = chat_body(BASE, "keep the slot busy", 2000);
    long["stream"] = json!(true);
    let answered = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let busy = scope.spawn(|| s.chat_stream(&long));
        std::thread::sleep(Duration::from_millis(100));
        let burst: Vec<_> = (0..12)
            .map(|i| {
                let answered = &answered;
                scope.spawn(move || {
                    let resp = client()
                        .post(format!("{}/v1/chat/completions", s.url))
                        .json(&chat_body(BASE, &format!("burst {i}"), 2))
                        .send()
                        .unwrap();
                    answered.fetch_add(1, Ordering::SeqCst);
                    (resp.status().as_u16(), resp.headers().get("retry-after").is_some())
                })
            })
            .collect();
        // The burst has been counted once the refusals are back (at least 4 in any case).
        assert!(wait_until(10, || answered.load(Ordering::SeqCst) >= 4));
        let (status, v) = s.post("/v1/chat/completions", &chat_body("good", "another tenant", 2));
        assert_eq!(status, 200, "another model is served during the burst: {v}");
        let results: Vec<(u16, bool)> = burst.into_iter().map(|h| h.join().unwrap()).collect();
        let accepted = results.iter().filter(|r| r.0 == 200).count();
        assert!((1..=4).contains(&accepted), "{results:?}");
        assert!(results.iter().all(|&(c, retry)| c == 200 || (c == 429 && retry)), "{results:?}");
        assert_eq!(busy.join().unwrap().1, "length", "the long stream outlasted the burst");
    });
}
