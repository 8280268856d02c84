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
}
