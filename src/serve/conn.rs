//! The HTTP/1 front door: our own accept loop over hyper, because `axum::serve` has no
//! timeouts and no connection cap, so idle or half-sent connections were held for ever and
//! past the file-descriptor limit nobody (not even `/health`) could connect.
//!
//! Per connection a watchdog closes it when
//! - no request is in flight and nothing arrived for `idle_timeout` (keep-alive idle), or
//! - a request's head (line + headers) has not fully arrived `header_timeout` after its first
//!   byte (slowloris);
//!
//! and a request body must arrive within `header_timeout` after its head (else 400). A
//! request in flight (streaming or not) is never cut by these timers: its length is the
//! engine's business. At most `max_connections` are open; beyond, a connection gets a 503 at
//! once (with a log line), not a hang in the accept backlog.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Connection limits (`--header-timeout`, `--idle-timeout`, `--max-connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// File descriptors kept back from connections: model and adapter files, the listener,
/// the loader's reads, logs. A cap at the fd limit itself would let sockets starve those.
fn fd_reserve(limit: u64) -> u64 {
    (limit / 8).max(64)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (many distributions start processes at
/// a soft 1,024 while allowing far more) and returns the soft limit now in force.
#[cfg(unix)]
pub fn raise_fd_limit() -> std::io::Result<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
        Ok(r.rlim_cur as u64)
    }
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> std::io::Result<u64> {
    Ok(u64::MAX)
}

/// The connection cap: what was asked, but always below the fd limit by [`fd_reserve`] (and
/// within what one semaphore acquire can count, for the shutdown drain).
pub fn connection_cap(asked: usize, fd_limit: u64) -> usize {
    let room = fd_limit.saturating_sub(fd_reserve(fd_limit)).clamp(1, u64::from(u32::MAX));
    asked.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// What a connection's watchdog reads: requests in flight and when the current phase began
/// (milliseconds since the connection opened).
struct ConnClock {
    opened: Instant,
    in_flight: AtomicUsize,
    /// When the connection last became idle (opened, or a response ended).
    idle_since: AtomicU64,
    /// First byte of a request whose head has not been handed to the router yet.
    head_started: AtomicU64,
}

const NONE: u64 = u64::MAX;

impl ConnClock {
    fn new() -> Self {
        Self { opened: Instant::now(), in_flight: AtomicUsize::new(0), idle_since: 0.into(), head_started: NONE.into() }
    }

    fn now(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 && self.head_started.load(Ordering::SeqCst) == NONE {
            self.head_started.store(self.now(), Ordering::SeqCst);
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(NONE, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the watchdog must close the connection, if nothing changes (`None`: in flight).
    fn deadline(&self, limits: &ConnLimits) -> Option<u64> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(match self.head_started.load(Ordering::SeqCst) {
            NONE => self.idle_since.load(Ordering::SeqCst) + limits.idle_timeout.as_millis() as u64,
            t => t + limits.header_timeout.as_millis() as u64,
        })
    }
}

/// One request in flight, from its head to the end (or drop) of its response body.
struct InFlight(Arc<ConnClock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves when the connection has overstayed a timeout.
async fn watchdog(clock: Arc<ConnClock>, limits: ConnLimits) {
    let poll = limits.header_timeout.min(limits.idle_timeout).max(Duration::from_millis(100));
    loop {
        let wait = match clock.deadline(&limits) {
            Some(at) if at <= clock.now() => return,
            Some(at) => Duration::from_millis(at - clock.now()),
            None => poll, // in flight: look again later
        };
        tokio::time::sleep(wait).await;
    }
}

/// The socket, noting when request bytes arrive.
struct Tracked {
    inner: TcpStream,
    clock: Arc<ConnClock>,
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.bytes_arrived();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body that fails once its deadline passes (a half-sent body must not hold a
/// handler, and its connection, for ever).
struct Deadline {
    inner: Incoming,
    at: tokio::time::Instant,
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for Deadline {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let at = this.at;
        if this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at))).as_mut().poll(cx).is_ready() {
            let msg = format!("the request body did not arrive within {:?} (--header-timeout)", this.limit);
            return Poll::Ready(Some(Err(msg.into())));
        }
        Poll::Pending
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped.
struct Guarded {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Rate-limited "cap reached" log: the first refusal, then one line per 10 s with a count.
#[derive(Default)]
struct CapLog {
    last: Option<Instant>,
    refused: u64,
}

impl CapLog {
    fn refused(&mut self, cap: usize) {
        self.refused += 1;
        if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            eprintln!(
                "lab serve: connection cap reached: {cap} open (--max-connections); refused {} connection(s) with 503",
                self.refused
            );
            self.last = Some(Instant::now());
            self.refused = 0;
        }
    }
}

const REFUSAL_BODY: &str = r#"{"error":{"message":"too many open connections (--max-connections); retry later","type":"server_error","param":null,"code":"overloaded"}}"#;

/// The 503 a connection over the cap gets (its request head read and ignored).
fn refusal() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    )
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish
/// their requests (idle ones close at once) and returns when every connection is gone.
pub async fn serve(listener: TcpListener, app: Router, limits: ConnLimits, shutdown: impl Future<Output = ()>) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    // Refusals are written by small tasks; bounded too, or a flood would spend the fds the cap saves.
    let refusing = Arc::new(Semaphore::new(64));
    let cap_log = Mutex::new(CapLog::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut accept_errors = CapLog::default();
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: the socket stays in the backlog; do not spin on it.
                    if accept_errors.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        eprintln!("lab serve: accept failed: {e}");
                        accept_errors.last = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            cap_log.lock().unwrap_or_else(|p| p.into_inner()).refused(limits.max_connections);
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tokio::spawn(refuse(stream, p));
            }
            continue;
        };
        let (app, stop) = (app.clone(), stop_rx.clone());
        tokio::spawn(async move {
            connection(stream, app, limits, stop).await;
            drop(permit);
        });
    }
    drop(listener); // no new connections
    let _ = stop_tx.send(true);
    // Every connection holds a permit: all permits back means all connections closed.
    let _ = open.acquire_many(u32::try_from(limits.max_connections).unwrap_or(u32::MAX)).await;
}

/// Writes the 503 to a connection over the cap, then gives the client a moment to read it.
///
/// The request head is read first (for at most 250 ms): a reply that arrives while the client
/// is still writing its request reads, to an HTTP client, as a response to nothing (hyper:
/// `UnexpectedMessage`), which a loaded machine made a flaky test of.
async fn refuse(mut stream: TcpStream, _permit: tokio::sync::OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(Duration::from_millis(250), async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(refusal().as_bytes()).await;
        let _ = stream.shutdown().await;
        // Read what the client sent so closing does not reset the connection under the reply.
        let mut sink = [0u8; 4096];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn connection(stream: TcpStream, app: Router, limits: ConnLimits, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true); // SSE tokens are small writes
    let clock = Arc::new(ConnClock::new());
    let io = TokioIo::new(Tracked { inner: stream, clock: clock.clone() });
    let svc_clock = clock.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = svc_clock.request_started();
        let at = tokio::time::Instant::now() + limits.header_timeout;
        let req = req.map(|inner| Deadline { inner, at, limit: limits.header_timeout, sleep: None });
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap_or_else(|e: Infallible| match e {});
            Ok::<_, Infallible>(resp.map(|inner| Guarded { inner, _in_flight: in_flight }))
        }
    });
    // hyper's own header timer is off: it also runs while a keep-alive connection is idle, so
    // it cannot tell the two timeouts apart; the watchdog does both.
    let conn = hyper::server::conn::http1::Builder::new().header_read_timeout(None).serve_connection(io, svc);
    tokio::pin!(conn);
    let dog = watchdog(clock, limits);
    tokio::pin!(dog);
    let mut draining = *stop.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = &mut dog => return, // dropping the connection closes the socket
            r = stop.changed(), if !draining => {
                draining = true;
                if r.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_fd_limit() {
        assert_eq!(connection_cap(4096, 20_000), 4096);
        assert_eq!(connection_cap(4096, 1024), 1024 - 128);
        assert_eq!(connection_cap(4096, 256), 256 - 64);
        assert_eq!(connection_cap(4096, 10), 1);
        assert_eq!(connection_cap(usize::MAX, u64::MAX), u32::MAX as usize, "RLIM_INFINITY");
    }

    #[test]
    fn the_refusal_is_well_formed_http() {
        let text = refusal();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "overloaded");
    }

    #[test]
    fn the_watchdog_deadline_follows_the_phase() {
        let limits = ConnLimits {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_connections: 1,
        };
        let c = Arc::new(ConnClock::new());
        assert_eq!(c.deadline(&limits), Some(5000), "idle from the start");
        c.head_started.store(1000, Ordering::SeqCst);
        assert_eq!(c.deadline(&limits), Some(3000), "a head under way gets the header timeout");
        let f = c.request_started();
        assert_eq!(c.deadline(&limits), None, "never cut a request in flight");
        c.bytes_arrived();
        assert_eq!(c.head_started.load(Ordering::SeqCst), NONE, "body bytes do not start a head");
        drop(f);
        assert!(c.deadline(&limits).unwrap() >= 5000, "idle again after the response");
    }
}
