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
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
        let listener = bind_listening(path).map_err(|e| bind_err(e.to_string()))?;
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

/// A listening socket at `path`, whose file appears only once it listens.
///
/// Bound in place, the file would appear at `bind(2)`, a moment before
/// `listen(2)`: a client that waits for the file and connects at once (as
/// scripts do with Firecracker's socket) would be refused in that moment.
/// So the socket is bound under a temporary name beside `path` and moved
/// there once it listens, without replacing a file that appeared at `path`
/// meanwhile (`RENAME_NOREPLACE`: that is an error, as `bind` would give).
fn bind_listening(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    // Unique per call too: two servers started at once in one process
    // must not bind, remove or rename each other's temporary socket.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".foliovm-{}-{}.sock",
        std::process::id(),
        SEQ.fetch_add(1, SeqCst)
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (from, to) = (c(&tmp)?, c(path)?);
    // SAFETY: renameat2(2) reads the two NUL-terminated paths, which live
    // until it returns; AT_FDCWD makes them relative to the working
    // directory, as `bind` took them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// The device and inode of the socket file at `path`.
fn socket_ident(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// The open connections, for the accepting thread to make room in when
/// all [`http::MAX_CONNECTIONS`] slots are taken.
#[derive(Default)]
struct Slots {
    next_id: u64,
    open: Vec<Slot>,
}

/// One open connection.
struct Slot {
    id: u64,
    /// A second handle, to shut the connection down.
    stream: UnixStream,
    /// Since when the connection has waited on its client (for a request,
    /// or for the rest of one); `None` while its request is queued,
    /// executed or answered.
    waiting_since: Option<Instant>,
}

impl Slots {
    /// Take a slot for `conn`, making room if all are taken: the
    /// connection that has waited on its client the longest, and at least
    /// [`http::EVICT_AFTER`], is shut down. `None` if there is no room.
    fn take(&mut self, conn: &UnixStream) -> Option<u64> {
        let stream = conn.try_clone().ok()?;
        if self.open.len() >= http::MAX_CONNECTIONS {
            let now = Instant::now();
            let victim = self
                .open
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.waiting_since?)))
                .filter(|(_, since)| now.duration_since(*since) >= http::EVICT_AFTER)
                .min_by_key(|(_, since)| *since)?
                .0;
            let slot = self.open.swap_remove(victim);
            // Its thread's read ends at once, and the thread with it.
            let _ = slot.stream.shutdown(std::net::Shutdown::Both);
            tracing::info!(
                waited_ms = slot
                    .waiting_since
                    .map_or(0, |t| now.duration_since(t).as_millis()),
                "API connections all taken: closed the one waiting longest on its client"
            );
        }
        self.next_id += 1;
        self.open.push(Slot {
            id: self.next_id,
            stream,
            waiting_since: Some(Instant::now()),
        });
        Some(self.next_id)
    }

    /// Connection `id` now waits on its client (`true`) or has a request
    /// to execute (`false`). `false` if the connection was closed to make
    /// room: its thread ends, and a request it read is not executed.
    fn set_waiting(&mut self, id: u64, waiting: bool) -> bool {
        match self.open.iter_mut().find(|s| s.id == id) {
            Some(s) => {
                s.waiting_since = match (waiting, s.waiting_since) {
                    (true, Some(t)) => Some(t),
                    (true, None) => Some(Instant::now()),
                    (false, _) => None,
                };
                true
            }
            None => false,
        }
    }

    fn release(&mut self, id: u64) {
        self.open.retain(|s| s.id != id);
    }
}

fn lock(slots: &Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    slots.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `api-accept` thread: a thread per connection, at most
/// [`http::MAX_CONNECTIONS`] at once. One more closes the connection that
/// has waited on its client the longest (at least [`http::EVICT_AFTER`]),
/// so that clients that connect and send nothing, or send slowly, cannot
/// lock others out; when every connection has a request in hand, it is
/// answered 503 and closed.
fn accept(listener: &UnixListener, jobs: &Sender<Job>, stop: &AtomicBool) {
    let slots = Arc::new(Mutex::new(Slots::default()));
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
        let Some(id) = lock(&slots).take(&conn) else {
            let busy = ApiResponse::error(ApiError {
                status: 503,
                message: format!(
                    "{} API connections are open and busy already; close one",
                    http::MAX_CONNECTIONS
                ),
            });
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = http::write_response(&mut conn, &busy, true);
            continue;
        };
        let (jobs, slots2) = (jobs.clone(), slots.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                connection(conn, &jobs, &slots2, id);
                lock(&slots2).release(id);
            });
        if spawned.is_err() {
            lock(&slots).release(id);
        }
    }
}

/// An `api-conn` thread: read requests, have each executed, answer.
fn connection(conn: UnixStream, jobs: &Sender<Job>, slots: &Mutex<Slots>, id: u64) {
    // A client that stops reading cannot hold the thread for ever.
    let _ = conn.set_write_timeout(Some(http::REQUEST_TIMEOUT));
    let mut reader = http::Reader::new(conn);
    loop {
        if !lock(slots).set_waiting(id, true) {
            return;
        }
        let next = reader.next_request();
        // Closed to make room while reading: answer nothing, execute nothing.
        if !lock(slots).set_waiting(id, false) {
            return;
        }
        let (resp, close) = match next {
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
        let resp = contained(|| route(backend, &req.method, &req.path, &req.body));
        if resp.status >= 400 {
            tracing::info!(method = %req.method, url = %req.path, status = resp.status, body = %resp.body, "API request refused");
        } else {
            tracing::debug!(method = %req.method, url = %req.path, status = resp.status, "API request");
        }
        // The connection may have gone away; nothing to do about it.
        let _ = reply.send(resp);
    }
}

/// Run `f`, turning a panic into a 500 answer. A request that hits a bug
/// fails alone: without this the `api` thread would end with it, and every
/// later request be answered 503 ("shutting down") while the VMs run on.
/// See [`crate::catch_panic`].
fn contained(f: impl FnOnce() -> ApiResponse) -> ApiResponse {
    crate::catch_panic(f).unwrap_or_else(|what| {
        tracing::error!(panic = %what, "an API request panicked");
        ApiResponse::error(ApiError {
            status: 500,
            message: format!("internal error: the request panicked ({what}); foliovm runs on"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A client that connects as soon as the socket file appears (how
    /// scripts wait for Firecracker's) is never refused: the file appears
    /// only once the server listens. Bound in place, it appeared at
    /// `bind(2)`, a moment before `listen(2)`, and a connection in that
    /// moment got `ECONNREFUSED`.
    #[test]
    fn the_socket_file_appears_only_once_it_takes_connections() {
        let dir = std::env::temp_dir().join(format!("foliovm-api-appear-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let mut refused = 0;
        for _ in 0..1000 {
            let p = path.clone();
            let watcher = std::thread::spawn(move || loop {
                if std::fs::symlink_metadata(&p).is_ok() {
                    return UnixStream::connect(&p).is_err();
                }
            });
            let backend: Arc<dyn ApiBackend> = Arc::new(routes::tests::Fake::default());
            let server = ApiServer::spawn(&path, backend).unwrap();
            refused += usize::from(watcher.join().unwrap());
            drop(server);
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            refused, 0,
            "connections refused right after the file appeared"
        );
    }

    /// Servers started at once in one process, on sockets in one
    /// directory, each get their own socket (the temporary names they bind
    /// first must not collide).
    #[test]
    fn servers_started_at_once_in_one_directory_each_get_their_socket() {
        let dir = std::env::temp_dir().join(format!("foliovm-api-many-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for round in 0..20 {
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let path = dir.join(format!("s{round}-{i}.sock"));
                    std::thread::spawn(move || {
                        let backend: Arc<dyn ApiBackend> = Arc::new(routes::tests::Fake::default());
                        let server = ApiServer::spawn(&path, backend)
                            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        assert!(UnixStream::connect(&path).is_ok(), "{}", path.display());
                        drop(server);
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A request that panics is answered 500, and the `api` thread goes
    /// on to answer the next one.
    #[test]
    fn a_panicking_request_gets_a_500_and_the_next_is_served() {
        let backend = Arc::new(routes::tests::Fake::default());
        backend.panics.store(true, SeqCst);
        let (jobs, queue) = mpsc::channel();
        let b = backend.clone();
        let server = std::thread::spawn(move || execute(&queue, &*b));
        for panics in [true, true, false] {
            backend.panics.store(panics, SeqCst);
            let (reply, answer) = mpsc::sync_channel(1);
            let req = http::Request {
                method: "GET".into(),
                path: "/".into(),
                body: Vec::new(),
                close: false,
            };
            jobs.send(Job::Request(req, reply)).unwrap();
            let resp = answer
                .recv_timeout(Duration::from_secs(10))
                .expect("the api thread answers");
            match panics {
                true => {
                    assert_eq!(resp.status, 500, "{}", resp.body);
                    assert!(resp.body.contains("a bug in GET /"), "{}", resp.body);
                }
                false => assert_eq!(resp.status, 200, "{}", resp.body),
            }
        }
        drop(jobs);
        server.join().unwrap();
    }

    /// `n` connections in `slots`, each waiting on its client since
    /// `ago`; returns the client ends.
    fn fill(slots: &mut Slots, n: usize, ago: Duration) -> Vec<UnixStream> {
        (0..n)
            .map(|_| {
                let (client, server) = UnixStream::pair().unwrap();
                slots.take(&server).expect("room");
                slots.open.last_mut().unwrap().waiting_since = Some(Instant::now() - ago);
                client
            })
            .collect()
    }

    fn closed(client: &mut UnixStream) -> bool {
        client.set_nonblocking(true).unwrap();
        matches!(client.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn a_full_house_closes_the_connection_waiting_longest_on_its_client() {
        let mut slots = Slots::default();
        let old = http::EVICT_AFTER * 2;
        let mut clients = fill(&mut slots, http::MAX_CONNECTIONS, old);
        // The oldest waiter has a request in hand now: it is not taken.
        slots.open[0].waiting_since = Some(Instant::now() - old * 3);
        assert!(slots.set_waiting(1, false));
        slots.open[1].waiting_since = Some(Instant::now() - old * 2);
        let (_, server) = UnixStream::pair().unwrap();
        let id = slots.take(&server).expect("room made");
        assert_eq!(slots.open.len(), http::MAX_CONNECTIONS);
        assert!(closed(&mut clients[1]), "the longest waiter was closed");
        assert!(!closed(&mut clients[0]) && !closed(&mut clients[2]));
        assert!(
            !slots.set_waiting(2, true),
            "its thread learns it was closed"
        );
        assert!(slots.set_waiting(1, true) && slots.set_waiting(id, false));
        slots.release(id);
        assert_eq!(slots.open.len(), http::MAX_CONNECTIONS - 1);
    }

    #[test]
    fn busy_or_recent_connections_are_never_closed_for_room() {
        let mut slots = Slots::default();
        let mut clients = fill(&mut slots, http::MAX_CONNECTIONS, Duration::ZERO);
        let (_, server) = UnixStream::pair().unwrap();
        assert_eq!(slots.take(&server), None, "all just connected: 503");
        for id in 1..=http::MAX_CONNECTIONS as u64 {
            assert!(slots.set_waiting(id, false));
        }
        for s in &mut slots.open {
            assert_eq!(s.waiting_since, None);
        }
        assert_eq!(slots.take(&server), None, "all busy: 503");
        assert!(clients.iter_mut().all(|c| !closed(c)));
    }
}
