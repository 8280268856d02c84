//! HTTP/1.1 on the API socket: one thread per connection reads and parses
//! requests (the request head with httparse), within limits that a client
//! cannot push the VMM past:
//!
//! | limit                         | answer                |
//! |-------------------------------|-----------------------|
//! | request line + headers        | [`MAX_HEAD`], else 431 |
//! | body (`Content-Length` only)  | [`MAX_BODY`], else 413 (unread) |
//! | a request, first byte to last | [`REQUEST_TIMEOUT`], else 408 |
//! | an idle kept-alive connection | closed after [`IDLE_TIMEOUT`] |
//! | connections at once           | [`MAX_CONNECTIONS`]: one more closes the one waiting longest (≥ [`EVICT_AFTER`]) on its client, else 503 |
//!
//! A connection that breaks a limit gets its answer and is closed; nothing
//! of it is read further. Requests are executed one at a time elsewhere
//! (see `super::ApiServer`): a slow or stalled client holds only its own
//! connection thread.

use super::routes::{ApiResponse, MAX_BODY};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;
/// Time from a request's first byte to its last.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a kept-alive connection may wait for its next request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// When all [`MAX_CONNECTIONS`] are open, one more closes the connection
/// that has waited on its client (for a request, or the rest of one) the
/// longest, if it has waited this long.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target, as sent.
    pub path: String,
    /// The body (at most [`MAX_BODY`] bytes).
    pub body: Vec<u8>,
    /// The client asked to close after this request (or spoke HTTP/1.0).
    pub close: bool,
}

/// A request that cannot be served: the status and message to answer
/// with, after which the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// For `fault_message`.
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// Reads requests from one connection. Bytes past a request (a pipelined
/// next one) stay buffered for the next call.
pub struct Reader<S> {
    stream: S,
    buf: Vec<u8>,
}

/// What the reader needs of a connection: reads with a timeout, and writes
/// (for `100 Continue`).
pub trait Conn: Read + Write {
    /// Bound the next reads (`None`: no bound).
    fn set_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for UnixStream {
    fn set_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl<S: Conn> Reader<S> {
    /// A reader of `stream`.
    pub fn new(stream: S) -> Self {
        Reader {
            stream,
            buf: Vec::new(),
        }
    }

    /// The connection, to answer on.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Read `more` bytes at most into the buffer before `deadline` (or,
    /// with none, before [`IDLE_TIMEOUT`]). `Ok(false)` at end of stream.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<bool, Refusal> {
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => IDLE_TIMEOUT,
        };
        if wait.is_zero() {
            return Err(refuse(408, "request not received in time"));
        }
        self.stream
            .set_timeout(Some(wait))
            .map_err(|e| refuse(500, e.to_string()))?;
        let mut chunk = [0u8; 4096];
        loop {
            return match self.stream.read(&mut chunk) {
                Ok(0) => Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(true)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Err(refuse(408, "request not received in time"))
                }
                Err(e) => Err(refuse(400, format!("reading the request: {e}"))),
            };
        }
    }

    /// The next request; `Ok(None)` when the client closed (or stayed idle
    /// past [`IDLE_TIMEOUT`]) between requests.
    ///
    /// # Errors
    /// A [`Refusal`] to answer before closing the connection.
    pub fn next_request(&mut self) -> Result<Option<Request>, Refusal> {
        let mut deadline = None;
        let (head_len, mut request, head) = loop {
            if !self.buf.is_empty() {
                // The clock starts at the request's first byte.
                deadline.get_or_insert_with(|| Instant::now() + REQUEST_TIMEOUT);
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&self.buf) {
                    // Complete in a read that crossed the cap.
                    Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
                        return Err(head_too_large());
                    }
                    Ok(httparse::Status::Complete(n)) => {
                        let head = Head::of(req.headers)?;
                        let request = Request {
                            method: req.method.unwrap_or("").to_string(),
                            path: req.path.unwrap_or("").to_string(),
                            body: Vec::new(),
                            close: req.version != Some(1),
                        };
                        break (n, request, head);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(refuse(431, format!("more than {MAX_HEADERS} headers")))
                    }
                    Err(e) => return Err(refuse(400, format!("malformed request: {e}"))),
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(head_too_large());
                }
            }
            let idle = deadline.is_none();
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) if idle => return Ok(None),
                Ok(false) => return Err(refuse(400, "connection closed mid-request")),
                // Idle between requests: just close.
                Err(_) if idle => return Ok(None),
                Err(r) => return Err(r),
            }
        };
        if head.length > MAX_BODY as u64 {
            return Err(refuse(
                413,
                format!(
                    "request body of {} bytes is larger than {MAX_BODY} bytes",
                    head.length
                ),
            ));
        }
        self.buf.drain(..head_len);
        let length = head.length as usize;
        if head.expect_continue && self.buf.len() < length {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|e| refuse(400, format!("writing 100 Continue: {e}")))?;
        }
        while self.buf.len() < length {
            if !self.fill(deadline)? {
                return Err(refuse(400, "body shorter than Content-Length"));
            }
        }
        request.body = self.buf.drain(..length).collect();
        request.close |= head.close;
        Ok(Some(request))
    }
}

fn head_too_large() -> Refusal {
    refuse(
        431,
        format!("request line and headers exceed {MAX_HEAD} bytes"),
    )
}

/// What the headers say about the body and the connection.
struct Head {
    /// `Content-Length`, 0 if absent.
    length: u64,
    /// `Expect: 100-continue`.
    expect_continue: bool,
    /// `Connection: close`.
    close: bool,
}

impl Head {
    fn of(headers: &[httparse::Header]) -> Result<Head, Refusal> {
        let mut head = Head {
            length: 0,
            expect_continue: false,
            close: false,
        };
        let mut length = None;
        for h in headers {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| refuse(400, format!("header {} is not UTF-8", h.name)))?
                .trim();
            let is = |name: &str| h.name.eq_ignore_ascii_case(name);
            if is("content-length") {
                // Digits only (RFC 9110 §8.6): `parse` would take "+5".
                // Past 64 bits it is still a length, too large (413).
                let n: u64 = Some(value)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .map(|v| v.parse().unwrap_or(u64::MAX))
                    .ok_or_else(|| refuse(400, format!("bad Content-Length {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(refuse(400, "conflicting Content-Length headers"));
                }
                length = Some(n);
            } else if is("transfer-encoding") {
                return Err(refuse(
                    411,
                    "Transfer-Encoding is not supported: send the body with Content-Length",
                ));
            } else if is("expect") {
                if !value.eq_ignore_ascii_case("100-continue") {
                    return Err(refuse(417, format!("cannot meet Expect: {value}")));
                }
                head.expect_continue = true;
            } else if is("connection") {
                head.close |= value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"));
            }
        }
        head.length = length.unwrap_or(0);
        Ok(head)
    }
}

/// Write `resp` as an HTTP/1.1 response; `close` adds `Connection: close`.
///
/// # Errors
/// The write's.
pub fn write_response(w: &mut impl Write, resp: &ApiResponse, close: bool) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&resp.body);
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// The reason phrase of the statuses the API answers with.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A connection that delivers `input` in the chunks given, then ends
    /// (or, `stalls`, times out as a silent client would).
    struct Fake {
        input: VecDeque<Vec<u8>>,
        stalls: bool,
        out: Vec<u8>,
        reads: usize,
    }

    impl Fake {
        fn new(chunks: &[&[u8]], stalls: bool) -> Self {
            Fake {
                input: chunks.iter().map(|c| c.to_vec()).collect(),
                stalls,
                out: Vec::new(),
                reads: 0,
            }
        }
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.reads += 1;
            let Some(mut c) = self.input.pop_front() else {
                return match self.stalls {
                    true => Err(ErrorKind::WouldBlock.into()),
                    false => Ok(0),
                };
            };
            let n = c.len().min(buf.len());
            buf[..n].copy_from_slice(&c[..n]);
            if n < c.len() {
                self.input.push_front(c.split_off(n));
            }
            Ok(n)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Conn for Fake {
        fn set_timeout(&mut self, _: Option<Duration>) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn req(method: &str, path: &str, body: &[u8], close: bool) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.to_vec(),
            close,
        }
    }

    #[test]
    fn requests_split_anywhere_and_pipelined_are_read_in_order() {
        let mut r = Reader::new(Fake::new(
            &[
                b"PUT /boot-source HTTP/1.1\r\nContent-Le",
                b"ngth: 5\r\n\r\nab",
                b"cdeGET / HTTP/1.1\r\n\r\nGET /vms HTTP/1.1\r\nConnection: close\r\n\r\n",
            ],
            false,
        ));
        assert_eq!(
            r.next_request().unwrap(),
            Some(req("PUT", "/boot-source", b"abcde", false))
        );
        assert_eq!(r.next_request().unwrap(), Some(req("GET", "/", b"", false)));
        assert_eq!(
            r.next_request().unwrap(),
            Some(req("GET", "/vms", b"", true))
        );
        assert_eq!(r.next_request().unwrap(), None, "the client closed");
    }

    #[test]
    fn http_1_0_closes_and_expect_gets_100_continue() {
        let mut r = Reader::new(Fake::new(&[b"GET / HTTP/1.0\r\n\r\n"], false));
        assert_eq!(r.next_request().unwrap(), Some(req("GET", "/", b"", true)));
        let mut r = Reader::new(Fake::new(
            &[
                b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
                b"{}",
            ],
            false,
        ));
        assert_eq!(
            r.next_request().unwrap(),
            Some(req("PUT", "/x", b"{}", false))
        );
        assert_eq!(r.stream().out, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn a_content_length_that_is_not_digits_is_refused() {
        for v in ["+2", "-2", "0x2", "2 2", "", "2.0"] {
            let head = format!("PUT /x HTTP/1.1\r\nContent-Length: {v}\r\n\r\n{{}}");
            let e = Reader::new(Fake::new(&[head.as_bytes()], false))
                .next_request()
                .unwrap_err();
            assert_eq!(e.status, 400, "Content-Length {v:?}");
        }
        let ok = b"PUT /x HTTP/1.1\r\nContent-Length: 02\r\n\r\n{}";
        assert_eq!(
            Reader::new(Fake::new(&[ok], false)).next_request().unwrap(),
            Some(req("PUT", "/x", b"{}", false))
        );
    }

    #[test]
    fn a_body_over_the_limit_is_refused_unread() {
        let head = format!("PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1u64 << 40);
        let mut r = Reader::new(Fake::new(&[head.as_bytes(), &[b'x'; 70_000]], false));
        assert_eq!(r.next_request().unwrap_err().status, 413);
        assert_eq!(r.stream().reads, 1, "the body was not read");
        let mut r = Reader::new(Fake::new(
            &[format!("PUT /x HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n").as_bytes()],
            false,
        ));
        assert_eq!(
            r.next_request().unwrap_err().status,
            400,
            "at the limit: read, then short"
        );
    }

    #[test]
    fn oversized_heads_and_unsupported_framing_are_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX-A: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 300 << 10));
        let mut r = Reader::new(Fake::new(&[&big], false));
        assert_eq!(r.next_request().unwrap_err().status, 431);
        assert!(
            r.stream().reads <= MAX_HEAD / 4096 + 2,
            "stopped at the cap"
        );
        let chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        assert_eq!(
            Reader::new(Fake::new(&[chunked], false))
                .next_request()
                .unwrap_err()
                .status,
            411
        );
        for bad in [
            &b"PUT /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n"[..],
            b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ] {
            let e = Reader::new(Fake::new(&[bad], false))
                .next_request()
                .unwrap_err();
            assert_eq!(e.status, 400, "{e:?}");
        }
    }

    /// A head over [`MAX_HEAD`] is refused however it arrives: in one
    /// read it completed before the cap was checked, and was served.
    #[test]
    fn a_head_over_the_cap_is_refused_even_in_one_piece() {
        let long = "a".repeat(MAX_HEAD);
        let head = format!("GET /{long} HTTP/1.1\r\n\r\n");
        // Short of the cap, then the rest in one read.
        let (a, b) = head.as_bytes().split_at(MAX_HEAD - 100);
        let e = Reader::new(Fake::new(&[a, b], false))
            .next_request()
            .map(|r| r.map(|r| r.path.len()))
            .unwrap_err();
        assert_eq!(e.status, 431, "{e:?}");
    }

    /// A Content-Length too large for 64 bits is still a length, and
    /// larger than [`MAX_BODY`]: 413, as a length within 64 bits is.
    #[test]
    fn a_content_length_past_u64_is_too_large() {
        for v in ["18446744073709551616", "99999999999999999999999999999"] {
            let head = format!("PUT /x HTTP/1.1\r\nContent-Length: {v}\r\n\r\n{{}}");
            let e = Reader::new(Fake::new(&[head.as_bytes()], false))
                .next_request()
                .unwrap_err();
            assert_eq!(e.status, 413, "Content-Length {v}: {e:?}");
        }
    }

    #[test]
    fn a_stalled_request_times_out_and_an_idle_connection_just_closes() {
        let mut r = Reader::new(Fake::new(
            &[b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nab"],
            true,
        ));
        assert_eq!(r.next_request().unwrap_err().status, 408);
        let mut r = Reader::new(Fake::new(&[b"GET / HTTP/1.1\r\n"], true));
        assert_eq!(r.next_request().unwrap_err().status, 408);
        assert_eq!(
            Reader::new(Fake::new(&[], true)).next_request().unwrap(),
            None,
            "idle: no answer, closed"
        );
        let mut r = Reader::new(Fake::new(&[b"GET / HTTP/1.1\r\n"], false));
        assert_eq!(
            r.next_request().unwrap_err().status,
            400,
            "closed mid-request"
        );
    }

    #[test]
    fn responses_carry_length_type_and_close() {
        let mut out = Vec::new();
        let resp = ApiResponse {
            status: 413,
            content_type: "application/json",
            body: "{}".into(),
        };
        write_response(&mut out, &resp, true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        );
    }

    // ---- Seeded hostile input -------------------------------------------

    use devices::testing::{for_each_seed, Rng};

    /// The seeds a run tries, each [`HTTP_CASES`] cases.
    const HTTP_SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 0x5eed_4771];
    const HTTP_CASES: usize = 300;

    /// The most a reader may hold: a head up to the cap, one read past it,
    /// and a body at the cap.
    const MAX_HELD: usize = MAX_HEAD + 4096 + MAX_BODY;

    /// A well-formed request: what it encodes to and what it parses to.
    struct Wire {
        bytes: Vec<u8>,
        want: Request,
    }

    /// `min..=max` characters of `alphabet`.
    fn token(rng: &mut Rng, alphabet: &[u8], min: usize, max: usize) -> String {
        let len = min + rng.below(max - min + 1);
        (0..len).map(|_| rng.pick(alphabet) as char).collect()
    }

    /// A request target: segments of URI characters, some hostile (`..`,
    /// percent-escapes, UTF-8, a query), now and then long.
    fn target(rng: &mut Rng) -> String {
        let mut p = String::new();
        for _ in 0..rng.below(4) {
            p.push('/');
            p.push_str(&match rng.below(8) {
                0 => "..".to_string(),
                1 => "%2e%2E%2f%00".to_string(),
                2 => "vm\u{e9}".to_string(),
                3 => token(rng, b"abz09-._~!$&'()*+,;=:@", 1, 2000),
                _ => token(rng, b"abcvmsdrive0123-._", 1, 12),
            });
        }
        if p.is_empty() {
            p.push('/');
        }
        if rng.one_in(6) {
            p.push_str("?a=1&b=%20");
        }
        p
    }

    /// A random well-formed request.
    fn well_formed(rng: &mut Rng) -> Wire {
        let method = rng.pick(&["GET", "PUT", "PATCH", "DELETE", "POST", "get", "X-Y!"]);
        let path = target(rng);
        let v10 = rng.one_in(8);
        let mut head = format!("{method} {path} HTTP/1.{}\r\n", if v10 { 0 } else { 1 });
        let body_len = match rng.below(4) {
            0 => 0,
            1 => rng.below(64),
            2 => rng.below(2048),
            _ => rng.below(MAX_BODY + 1),
        };
        let body: Vec<u8> = (0..body_len).map(|_| rng.next_u64() as u8).collect();
        let mut headers = vec![format!("Host: localhost")];
        if body_len > 0 || rng.one_in(3) {
            let zeros = "0".repeat(rng.below(3));
            headers.push(format!(
                "Content-Length:{}{zeros}{body_len}",
                " ".repeat(rng.below(3))
            ));
        }
        let mut close = v10;
        if rng.one_in(4) {
            let (v, c) = rng.pick(&[
                ("close", true),
                ("Close", true),
                ("keep-alive", false),
                ("keep-alive, close", true),
            ]);
            headers.push(format!("Connection: {v}"));
            close |= c;
        }
        if body_len > 0 && rng.one_in(8) {
            headers.push("Expect: 100-continue".into());
        }
        for _ in 0..rng.below(4) {
            let name = token(rng, b"abcXYZ-_!#$%&'*+.^`|~09", 1, 10);
            let value = token(rng, b"abc 09\t,;=\"", 0, 29);
            headers.push(format!("{name}: {value}"));
        }
        // The headers' order is the client's.
        for i in (1..headers.len()).rev() {
            headers.swap(i, rng.below(i + 1));
        }
        for h in headers {
            head.push_str(&h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
        Wire {
            bytes,
            want: req(method, &path, &body, close),
        }
    }

    /// `input` cut into pieces as a client's writes might arrive: whole,
    /// a byte at a time, or in random sizes.
    fn delivered(rng: &mut Rng, input: &[u8], stalls: bool) -> Reader<Fake> {
        let max = match rng.below(4) {
            0 => input.len().max(1),
            // A byte at a time, for heads that are not long (each byte
            // parses the head again).
            1 if input.len() < 4096 => 1,
            2 => 1 + rng.below(16),
            _ => 1 + rng.below(6000),
        };
        let mut chunks = VecDeque::new();
        let mut rest = input;
        while !rest.is_empty() {
            let n = (1 + rng.below(max)).min(rest.len());
            chunks.push_back(rest[..n].to_vec());
            rest = &rest[n..];
        }
        Reader::new(Fake {
            input: chunks,
            stalls,
            out: Vec::new(),
            reads: 0,
        })
    }

    /// A refusal is a client error with a message, and the statuses of
    /// the limits are the limits'.
    fn check_refusal(e: &Refusal, what: &str) {
        assert!(
            [400, 408, 411, 413, 417, 431].contains(&e.status),
            "{what}: status {e:?}"
        );
        assert!(!e.message.trim().is_empty(), "{what}: no message {e:?}");
    }

    /// `v` for a failure message, cut short.
    fn show(v: &impl std::fmt::Debug) -> String {
        let s = format!("{v:?}");
        match s.char_indices().nth(300) {
            Some((i, _)) => format!("{}... ({} bytes)", &s[..i], s.len()),
            None => s,
        }
    }

    fn next(r: &mut Reader<Fake>, what: &str) -> Result<Option<Request>, Refusal> {
        let got = r.next_request();
        assert!(
            r.buf.len() <= MAX_HELD,
            "{what}: holds {} bytes",
            r.buf.len()
        );
        if let Err(e) = &got {
            check_refusal(e, what);
        }
        got
    }

    /// Well-formed requests, pipelined and cut anywhere, all parse to what
    /// they encode, in order; cut short by the client's end, the one cut
    /// is refused with 400 (or, cut between requests, the connection just
    /// closes).
    #[test]
    fn pipelined_well_formed_requests_parse_however_they_arrive() {
        for_each_seed("http pipelined", &HTTP_SEEDS, |seed| {
            let mut rng = Rng::new(seed);
            for case in 0..HTTP_CASES / 2 {
                let wires: Vec<Wire> = (0..1 + rng.below(3))
                    .map(|_| well_formed(&mut rng))
                    .collect();
                // Past a close, nothing more is read by the server; the
                // reader itself still parses what follows.
                let mut input: Vec<u8> = wires.iter().flat_map(|w| w.bytes.clone()).collect();
                let cut = match rng.one_in(3) {
                    true => rng.below(input.len() + 1),
                    false => input.len(),
                };
                input.truncate(cut);
                let what = format!("case {case}, cut at {cut}");
                let mut r = delivered(&mut rng, &input, false);
                let mut end = 0;
                for w in &wires {
                    end += w.bytes.len();
                    let got = next(&mut r, &what);
                    if end <= cut {
                        assert!(got == Ok(Some(w.want.clone())), "{what}: {}", show(&got));
                    } else if end - w.bytes.len() == cut {
                        assert_eq!(got, Ok(None), "{what}: cut between requests");
                        break;
                    } else {
                        let e = got.expect_err(&what);
                        assert_eq!(e.status, 400, "{what}: {e:?}");
                        break;
                    }
                }
                if end <= cut {
                    assert_eq!(next(&mut r, &what), Ok(None), "{what}: the client closed");
                }
            }
        });
    }

    /// What a mutated request must come to.
    #[derive(Debug)]
    enum Outcome {
        /// This request.
        Parses(Request),
        /// A refusal with this status.
        Refused(u16),
        /// This request, or a refusal (an obs-text header value).
        ParsesOrRefused(Request),
        /// This request, with bytes after it that are no request.
        ParsesThenGarbage(Request),
        /// Random damage: anything but a panic or a 5xx.
        Any,
    }

    /// A well-formed request with one hostile change, and what it must
    /// come to.
    fn mutated(rng: &mut Rng) -> (Vec<u8>, Outcome) {
        let body = token(rng, b"{}\"abc:,0", 0, 39);
        let path = target(rng);
        let ok = |close| Outcome::Parses(req("PUT", &path, body.as_bytes(), close));
        let with = |headers: &str, body: &str| {
            format!("PUT {path} HTTP/1.1\r\n{headers}\r\n{body}").into_bytes()
        };
        let cl = format!("Content-Length: {}\r\n", body.len());
        match rng.below(22) {
            0 => {
                let v = rng.pick(&[
                    "-1", "+5", "0x5", "5 5", "5, 5", "", "5.0", "\u{663}", "1e3",
                ]);
                (
                    with(&format!("Content-Length: {v}\r\n"), &body),
                    Outcome::Refused(400),
                )
            }
            1 => {
                // Larger than the cap, within u64 or past it.
                let v = rng.pick(&[
                    "65537",
                    "18446744073709551615",
                    "18446744073709551616",
                    "99999999999999999999999999999",
                    "000000000000000000000000000000070000",
                ]);
                (
                    with(&format!("Content-Length: {v}\r\n"), &body),
                    Outcome::Refused(413),
                )
            }
            2 => {
                let other = body.len() + 1 + rng.below(5);
                let h = format!("{cl}Content-Length: {other}\r\n");
                (with(&h, &body), Outcome::Refused(400))
            }
            3 => (with(&format!("{cl}{cl}"), &body), ok(false)),
            4 => {
                let te = rng.pick(&["chunked", "gzip, chunked", "identity", ""]);
                let h = format!("{cl}Transfer-Encoding: {te}\r\n");
                (with(&h, &body), Outcome::Refused(411))
            }
            5 => {
                // obs-fold: a header line continued on the next.
                (
                    with(&format!("{cl}X-A: a\r\n b\r\n"), &body),
                    Outcome::Refused(400),
                )
            }
            6 => (
                with(&format!("{cl}NoColon\r\n"), &body),
                Outcome::Refused(400),
            ),
            7 => (
                with(&format!("{cl}X A: b\r\n"), &body),
                Outcome::Refused(400),
            ),
            8 => (
                with(&format!("{cl}X-A : b\r\n"), &body),
                Outcome::Refused(400),
            ),
            9 => (
                with(&format!("{cl}X-\u{e9}: b\r\n"), &body),
                Outcome::Refused(400),
            ),
            10 => {
                // Non-ASCII values: UTF-8 ones are fine, others refused.
                let mut b = with(&format!("{cl}X-A: caf\u{e9}\r\n"), &body);
                if rng.one_in(2) {
                    let at = b.windows(2).position(|w| w == [0xc3, 0xa9]).unwrap();
                    b[at] = 0xff;
                }
                (
                    b,
                    Outcome::ParsesOrRefused(req("PUT", &path, body.as_bytes(), false)),
                )
            }
            11 => {
                let v = rng.pick(&[
                    "HTTP/2.0",
                    "HTTP/1.2",
                    "HTTP/1",
                    "http/1.1",
                    "HTTP/1.1x",
                    "",
                ]);
                let b = format!("PUT {path} {v}\r\n{cl}\r\n{body}").into_bytes();
                (b, Outcome::Refused(400))
            }
            12 => {
                // A path that is not UTF-8.
                let mut b = with(&cl, &body);
                b.splice(4..5, [b'/', 0xff, 0xfe]);
                (b, Outcome::Refused(400))
            }
            13 => {
                let m = rng.pick(&["", "G(T", "GE T", "\u{e9}"]);
                let b = format!("{m} {path} HTTP/1.1\r\n{cl}\r\n{body}").into_bytes();
                (b, Outcome::Refused(400))
            }
            14 => {
                // A head over the cap, in a long path or a long header.
                let long = "a".repeat(MAX_HEAD + rng.below(8000));
                let b = match rng.one_in(2) {
                    true => format!("PUT /{long} HTTP/1.1\r\n{cl}\r\n{body}").into_bytes(),
                    false => with(&format!("{cl}X-Long: {long}\r\n"), &body),
                };
                (b, Outcome::Refused(431))
            }
            15 => {
                let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
                (with(&format!("{cl}{many}"), &body), Outcome::Refused(431))
            }
            16 => {
                let h = format!("{cl}Expect: {}\r\n", rng.pick(&["100-continues", "x", ""]));
                (with(&h, &body), Outcome::Refused(417))
            }
            17 => {
                // Longer than declared: the rest is the next request's.
                let short = body.len() / 2;
                let h = format!("Content-Length: {short}\r\n");
                let want = req("PUT", &path, &body.as_bytes()[..short], false);
                (with(&h, &body), Outcome::ParsesThenGarbage(want))
            }
            18 => {
                // Shorter than declared (even with the request sent after
                // it), then the client's end.
                let h = format!("Content-Length: {}\r\n", body.len() + 100 + rng.below(100));
                (with(&h, &body), Outcome::Refused(400))
            }
            19 => {
                // Blank lines before the request line are skipped.
                let mut b = b"\r\n\n".to_vec();
                b.extend(with(&cl, &body));
                (b, ok(false))
            }
            20 => {
                // Duplicate headers that the reader does not act on, and a
                // repeated Connection.
                let h = format!(
                    "{cl}X-A: 1\r\nX-A: 2\r\nConnection: keep-alive\r\nConnection: close\r\n"
                );
                (with(&h, &body), ok(true))
            }
            _ => {
                // Random damage to a well-formed request.
                let mut b = well_formed(rng).bytes;
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len() + 1);
                    match rng.below(3) {
                        0 if at < b.len() => b[at] = rng.pick(b"\r\n :\x00\xff\x7f\t0a-/"),
                        1 => b.insert(at, rng.next_u64() as u8),
                        _ if at < b.len() => {
                            b.remove(at);
                        }
                        _ => {}
                    }
                }
                (b, Outcome::Any)
            }
        }
    }

    /// Hostile requests, each followed by a well-formed one on the same
    /// connection: each is refused with its 4xx and a message, or parses
    /// to the request it still encodes; once one parses, the well-formed
    /// one after it does too (or is refused as a whole, when random
    /// damage made the first one swallow part of it). The reader never
    /// holds more than its limits allow.
    #[test]
    fn hostile_requests_are_refused_or_parsed_exactly() {
        for_each_seed("http hostile", &HTTP_SEEDS, |seed| {
            let mut rng = Rng::new(seed);
            for case in 0..HTTP_CASES {
                let (mut input, outcome) = mutated(&mut rng);
                let first = input.len();
                let then = req("GET", "/vms", b"", true);
                input.extend_from_slice(b"GET /vms HTTP/1.1\r\nConnection: close\r\n\r\n");
                let what = format!(
                    "case {case}: {outcome:?} from {:?}",
                    show(&String::from_utf8_lossy(&input[..first]))
                );
                let mut r = delivered(&mut rng, &input, false);
                let got = next(&mut r, &what);
                match (&outcome, &got) {
                    (Outcome::Parses(w) | Outcome::ParsesThenGarbage(w), Ok(Some(g))) => {
                        assert!(g == w, "{what}: got {}", show(g))
                    }
                    (Outcome::ParsesOrRefused(w), Ok(Some(g))) => {
                        assert!(g == w, "{what}: got {}", show(g))
                    }
                    (Outcome::ParsesOrRefused(_), Err(e)) => assert_eq!(e.status, 400, "{what}"),
                    (Outcome::Refused(s), Err(e)) => assert_eq!(e.status, *s, "{what}: {e:?}"),
                    (Outcome::Any, Ok(Some(g))) => {
                        // What it parsed to is what a well-formed request
                        // with its fields encodes.
                        let mut again = format!(
                            "{} {} HTTP/1.1\r\nContent-Length: {}\r\n",
                            g.method,
                            g.path,
                            g.body.len()
                        );
                        if g.close {
                            again.push_str("Connection: close\r\n");
                        }
                        let mut again = again.into_bytes();
                        again.extend_from_slice(b"\r\n");
                        again.extend_from_slice(&g.body);
                        let mut r2 = delivered(&mut rng, &again, false);
                        assert_eq!(
                            next(&mut r2, &what).as_ref(),
                            Ok(&Some(g.clone())),
                            "{what}"
                        );
                    }
                    (Outcome::Any, Err(_)) => {}
                    _ => panic!("{what}: got {}", show(&got)),
                }
                if matches!(
                    (&outcome, &got),
                    (
                        Outcome::Parses(_) | Outcome::ParsesOrRefused(_),
                        Ok(Some(_))
                    )
                ) {
                    assert_eq!(
                        next(&mut r, &what),
                        Ok(Some(then.clone())),
                        "{what}: the next one"
                    );
                }
                if matches!(outcome, Outcome::Any | Outcome::ParsesThenGarbage(_)) {
                    // Whatever came first, the rest never panics.
                    for _ in 0..4 {
                        if !matches!(next(&mut r, &what), Ok(Some(_))) {
                            break;
                        }
                    }
                }
            }
        });
    }
}
