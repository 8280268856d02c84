//! A minimal client for the API socket, used by `foliovm ctl` and tests.
//! Responses are parsed with httparse; requests are one `Connection: close`
//! exchange each.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Cannot connect (no foliovm listening there?).
    #[error("cannot connect to the API socket {path}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("API request failed")]
    Io(#[from] std::io::Error),
    /// The answer is not valid HTTP.
    #[error("malformed API response: {0}")]
    Malformed(String),
}

/// An API answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
}

impl Reply {
    /// The body as JSON, or `Null` when empty.
    pub fn json(&self) -> serde_json::Value {
        if self.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&self.body).unwrap_or(serde_json::Value::String(self.body.clone()))
        }
    }

    /// `fault_message` of an error answer.
    pub fn fault(&self) -> Option<String> {
        self.json()["fault_message"].as_str().map(str::to_string)
    }
}

/// Send one request and wait (up to `timeout`) for the answer.
///
/// # Errors
/// [`ClientError`].
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let mut s = UnixStream::connect(sock).map_err(|source| ClientError::Connect {
        path: sock.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Result<Reply, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp
        .parse(raw)
        .map_err(|e| ClientError::Malformed(e.to_string()))?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            return Err(ClientError::Malformed("truncated response".into()))
        }
    };
    let status = resp
        .code
        .ok_or_else(|| ClientError::Malformed("no status".into()))?;
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let rest = &raw[head_len..];
    let body = match len {
        Some(n) if n <= rest.len() => &rest[..n],
        Some(_) => {
            return Err(ClientError::Malformed(
                "body shorter than Content-Length".into(),
            ))
        }
        None => rest,
    };
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        let r = parse_reply(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 22\r\n\r\n{\"fault_message\":\"x\"}\n",
        )
        .unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.fault().as_deref(), Some("x"));
        let r = parse_reply(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.json()), (204, serde_json::Value::Null));
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").is_err());
        assert!(parse_reply(b"garbage").is_err());
    }
}
