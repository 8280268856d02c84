//! The HTTP/1.1 + JSON API on a Unix socket (`--api-sock`), and its client.
//!
//! HTTP is tiny_http's job; [`routes`] decides what a request means.

pub mod client;
pub mod routes;

use routes::{route, ApiBackend, MAX_BODY};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket path exists and is not a stale socket, or cannot be bound.
    #[error("cannot listen on API socket {path}: {reason}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A running API server; stops when dropped.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Listen on `path` (a stale socket file there is replaced; any other
    /// file is an error) and serve requests on a thread of its own.
    ///
    /// # Errors
    /// [`ApiServerError::Bind`].
    pub fn spawn(path: &Path, backend: Arc<dyn ApiBackend>) -> Result<ApiServer, ApiServerError> {
        let bind_err = |reason: String| ApiServerError::Bind {
            path: path.to_path_buf(),
            reason,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(bind_err("a file that is not a socket is in the way".into()));
            }
            std::fs::remove_file(path).map_err(|e| bind_err(e.to_string()))?;
        }
        let server =
            Arc::new(tiny_http::Server::http_unix(path).map_err(|e| bind_err(e.to_string()))?);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&s, backend.as_ref()))
            .map_err(|e| bind_err(e.to_string()))?;
        Ok(ApiServer {
            server,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

impl ApiServer {
    /// Stop serving: no new requests are taken, and `pump` runs until the
    /// request being served has its answer. A request may be waiting for
    /// the event loop (an InstanceStart builds its VM there): `pump` runs
    /// that loop, which has stopped running otherwise.
    pub fn shut_down(mut self, mut pump: impl FnMut()) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                pump();
            }
            let _ = t.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(server: &tiny_http::Server, backend: &dyn ApiBackend) {
    for mut request in server.incoming_requests() {
        let mut body = Vec::new();
        // Read one byte past the limit so the router can refuse oversize bodies.
        let _ = request
            .as_reader()
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body);
        let method = request.method().as_str().to_string();
        let resp = route(backend, &method, request.url(), &body);
        if resp.status >= 400 {
            tracing::info!(%method, url = request.url(), status = resp.status, body = %resp.body, "API request refused");
        } else {
            tracing::debug!(%method, url = request.url(), status = resp.status, "API request");
        }
        let header =
            tiny_http::Header::from_bytes(&b"Content-Type"[..], resp.content_type.as_bytes())
                .expect("a static ASCII header is valid");
        let response = tiny_http::Response::from_string(resp.body)
            .with_status_code(resp.status)
            .with_header(header);
        // The client may have gone away; nothing to do about it.
        let _ = request.respond(response);
    }
}
