//! The HTTP/1.1 + JSON API on a Unix socket (`--api-sock`), and its client.
//!
//! [`http`] reads requests, one thread per connection, within limits;
//! [`routes`] decides what a request means. Requests are executed one at a
//! time, in arrival order, on the `api` thread (as Firecracker's API
//! thread does): a connection thread hands its parsed request over and
//! writes the answer it gets back.
//!
//! ```text
//! api-accept --spawns--> api-conn (per connection) --Request--> api (route)
//!                                  <------------ApiResponse---------+
//! ```

pub mod client;
pub mod http;
pub mod routes;

use routes::{route, ApiBackend, ApiError, ApiResponse};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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
    stop: Arc<AtomicBool>,
    /// The listening socket (a second handle): shut down to wake the
    /// accepting thread, whatever became of the socket's path.
    listener: UnixListener,
    /// The socket file's device and inode: removed on drop only if the
    /// path still names this socket.
    ident: (u64, u64),
    /// To tell the `api` thread to stop ([`Job::Stop`]).
    jobs: Sender<Job>,
    accept: Option<JoinHandle<()>>,
    execute: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// What the `api` thread is given to do.
enum Job {
    /// Execute a parsed request and send the answer back.
    Request(http::Request, SyncSender<ApiResponse>),
    /// Stop (after the request before, if any).
    Stop,
}

impl ApiServer {
    /// Listen on `path` (a stale socket file there is replaced; a socket
    /// another process serves, or any other file, is an error) and serve
    /// requests on threads of their own.
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
            // A socket someone still listens on is another process's API
            // (another foliovm, say): replacing it would cut that process
            // off from its users. Only a stale one (connection refused)
            // is replaced.
            if UnixStream::connect(path).is_ok() {
                return Err(bind_err(
                    "another process is serving this socket (is another foliovm running?)".into(),
                ));
            }
            std::fs::remove_file(path).map_err(|e| bind_err(e.to_string()))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| bind_err(e.to_string()))?;
        let ident = socket_ident(path).map_err(|e| bind_err(e.to_string()))?;
        let handle = listener.try_clone().map_err(|e| bind_err(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (jobs, queue) = mpsc::channel::<Job>();
        let execute = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || execute(&queue, backend.as_ref()))
            .map_err(|e| bind_err(e.to_string()))?;
        let (s, j) = (stop.clone(), jobs.clone());
        let accept = std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept(&listener, &j, &s));
        let accept = match accept {
            Ok(t) => t,
            Err(e) => {
                let _ = jobs.send(Job::Stop);
                let _ = execute.join();
                return Err(bind_err(e.to_string()));
            }
        };
        Ok(ApiServer {
            stop,
            listener: handle,
            ident,
            jobs,
            accept: Some(accept),
            execute: Some(execute),
            path: path.to_path_buf(),
        })
    }

    /// No new connections or requests are taken; waits for the accepting
    /// thread to end.
    fn stop_accepting(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.accept.take() {
            // SAFETY: shutdown(2) on a socket this server owns (kept open
            // by `self.listener`); it takes no pointers. A blocked accept on
            // it returns (EINVAL) and the thread sees the flag; connecting
            // to the path would not reach it if the file was removed or
            // replaced meanwhile.
            unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = t.join();
        }
        let _ = self.jobs.send(Job::Stop);
    }

    /// Stop serving: no new requests are taken, and `pump` runs until the
    /// request being executed has its answer. A request may be waiting for
    /// the event loop (an InstanceStart builds its VM there): `pump` runs
    /// that loop, which has stopped running otherwise. Connection threads
    /// are not waited for: each ends at its client's next byte or timeout.
    pub fn shut_down(mut self, mut pump: impl FnMut()) {
        self.stop_accepting();
        if let Some(t) = self.execute.take() {
            while !t.is_finished() {
                pump();
            }
            let _ = t.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_accepting();
        if let Some(t) = self.execute.take() {
            let _ = t.join();
        }
        // Another foliovm may have taken the path over since.
        if socket_ident(&self.path).ok() == Some(self.ident) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The device and inode of the socket file at `path`.
fn socket_ident(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The `api-accept` thread: a thread per connection, at most
/// [`http::MAX_CONNECTIONS`] at once; one more is answered 503 and closed.
fn accept(listener: &UnixListener, jobs: &Sender<Job>, stop: &AtomicBool) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(SeqCst) {
            return;
        }
        // Shut down under us by someone else: nothing more will come.
        if matches!(&conn, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            return;
        }
        let Ok(mut conn) = conn else {
            // Out of fds, say: the error repeats at once; do not spin on it.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if open.load(SeqCst) >= http::MAX_CONNECTIONS {
            let busy = ApiResponse::error(ApiError {
                status: 503,
                message: format!(
                    "{} API connections are open already; close one",
                    http::MAX_CONNECTIONS
                ),
            });
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = http::write_response(&mut conn, &busy, true);
            continue;
        }
        open.fetch_add(1, SeqCst);
        let (jobs, open2) = (jobs.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                connection(conn, &jobs);
                open2.fetch_sub(1, SeqCst);
            });
        if spawned.is_err() {
            open.fetch_sub(1, SeqCst);
        }
    }
}

/// An `api-conn` thread: read requests, have each executed, answer.
fn connection(conn: UnixStream, jobs: &Sender<Job>) {
    // A client that stops reading cannot hold the thread for ever.
    let _ = conn.set_write_timeout(Some(http::REQUEST_TIMEOUT));
    let mut reader = http::Reader::new(conn);
    loop {
        let (resp, close) = match reader.next_request() {
            Ok(None) => return,
            Ok(Some(req)) => {
                let close = req.close;
                let (tx, rx) = mpsc::sync_channel(1);
                let job = Job::Request(req, tx);
                let resp = match jobs.send(job).ok().and_then(|()| rx.recv().ok()) {
                    Some(resp) => resp,
                    None => ApiResponse::error(ApiError {
                        status: 503,
                        message: "foliovm is shutting down".into(),
                    }),
                };
                (resp, close)
            }
            Err(refusal) => {
                tracing::info!(
                    status = refusal.status,
                    reason = %refusal.message,
                    "API request refused before routing"
                );
                let resp = ApiResponse::error(ApiError {
                    status: refusal.status,
                    message: refusal.message,
                });
                (resp, true)
            }
        };
        if http::write_response(reader.stream(), &resp, close).is_err() || close {
            return;
        }
    }
}

/// The `api` thread: execute requests one at a time until told to stop.
/// Requests queued behind the stop are dropped with the queue, and their
/// connections answer 503.
fn execute(queue: &Receiver<Job>, backend: &dyn ApiBackend) {
    while let Ok(Job::Request(req, reply)) = queue.recv() {
        let resp = route(backend, &req.method, &req.path, &req.body);
        if resp.status >= 400 {
            tracing::info!(method = %req.method, url = %req.path, status = resp.status, body = %resp.body, "API request refused");
        } else {
            tracing::debug!(method = %req.method, url = %req.path, status = resp.status, "API request");
        }
        // The connection may have gone away; nothing to do about it.
        let _ = reply.send(resp);
    }
}
