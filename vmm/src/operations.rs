//! Long operations (reclaim, compaction, budget changes) that
//! run on a thread of their own while the API answers at once with an id,
//! and report their progress for `GET /operations/{id}`.
//!
//! An operation is a [`Job`]: a closure that receives a [`Progress`]
//! reporter and returns a JSON result or an error message. The API
//! validates a request and resolves what it names *before* it builds the
//! job, so a job that starts has nothing left to refuse.
//!
//! ```text
//! spawn() --> Running --closure returns Ok--> Succeeded { result }
//!                |
//!                +--closure returns Err--> Failed { error }
//! ```
//! The registry keeps every running operation and the last
//! [`KEEP_FINISHED`] finished ones.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Finished operations kept for `GET /operations`.
pub const KEEP_FINISHED: usize = 32;
/// Operations that may run at once.
pub const MAX_RUNNING: usize = 4;

/// An operation's id: `GET /operations/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OperationId(pub u64);

/// The progress reporter an operation's closure receives: how much of
/// `total` is done, in `unit`s. Reads and writes are relaxed; a reader
/// may see `done` a step behind.
#[derive(Debug)]
pub struct Progress {
    unit: &'static str,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Nothing done of `total` `unit`s.
    pub fn new(unit: &'static str, total: u64) -> Progress {
        Progress {
            unit,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
        }
    }

    /// `n` more units are done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Relaxed);
    }

    /// `n` units are done in all (for work that counts absolutely, like
    /// mem's compaction callback `progress(done, total)`).
    pub fn set_done(&self, n: u64) {
        self.done.store(n, Relaxed);
    }

    /// The total changed (an operation may learn it as it goes).
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Relaxed);
    }

    /// Units done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Relaxed)
    }

    /// The total.
    pub fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    fn to_json(&self) -> Value {
        json!({ "done": self.done(), "total": self.total(), "unit": self.unit })
    }
}

/// What a job's closure does: the work, reporting progress.
type Work = Box<dyn FnOnce(&Progress) -> Result<Value, String> + Send>;

/// A validated long operation, ready to run now ([`Job::run_now`]) or on a
/// thread ([`Operations::spawn`]).
pub struct Job {
    kind: &'static str,
    progress: Progress,
    work: Work,
}

impl Job {
    /// A job of `kind` (`reclaim`, ...) whose progress counts `unit`s out
    /// of `total`.
    pub fn new(
        kind: &'static str,
        unit: &'static str,
        total: u64,
        work: impl FnOnce(&Progress) -> Result<Value, String> + Send + 'static,
    ) -> Job {
        Job {
            kind,
            progress: Progress::new(unit, total),
            work: Box::new(work),
        }
    }

    /// The kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Run on this thread and return the result.
    ///
    /// # Errors
    /// The closure's error message.
    pub fn run_now(self) -> Result<Value, String> {
        (self.work)(&self.progress)
    }
}

/// Where an operation is in its lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub enum OpState {
    /// The closure is running.
    Running,
    /// It returned a result.
    Succeeded(Value),
    /// It returned an error.
    Failed(String),
}

/// One operation in the registry.
#[derive(Debug)]
struct Record {
    id: OperationId,
    kind: &'static str,
    started: Instant,
    progress: Arc<Progress>,
    /// Leaf lock; the state and the time the operation finished.
    state: Mutex<(OpState, Option<Instant>)>,
}

impl Record {
    fn to_json(&self) -> Value {
        let (state, finished) = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let elapsed = finished.unwrap_or_else(Instant::now) - self.started;
        let mut o = json!({
            "id": self.id.0,
            "kind": self.kind,
            "state": match state {
                OpState::Running => "running",
                OpState::Succeeded(_) => "succeeded",
                OpState::Failed(_) => "failed",
            },
            "progress": self.progress.to_json(),
            "elapsed_ms": elapsed.as_millis() as u64,
        });
        match state {
            OpState::Running => {}
            OpState::Succeeded(v) => o["result"] = v,
            OpState::Failed(e) => o["error"] = json!(e),
        }
        o
    }

    fn is_running(&self) -> bool {
        matches!(
            self.state.lock().unwrap_or_else(|p| p.into_inner()).0,
            OpState::Running
        )
    }
}

/// Errors from [`Operations::spawn`].
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// [`MAX_RUNNING`] operations are running already.
    #[error("{0} operations are running already; wait for one to finish")]
    TooMany(usize),
    /// The operation's thread could not be started.
    #[error("cannot start the operation's thread")]
    Thread(#[source] std::io::Error),
}

/// The registry of operations.
#[derive(Debug, Default)]
pub struct Operations {
    /// Leaf lock: ids, and records by id.
    ops: Mutex<(u64, BTreeMap<OperationId, Arc<Record>>)>,
}

impl Operations {
    /// Start `job` on a thread of its own; returns the operation as JSON
    /// (its `id` included) at once.
    ///
    /// # Errors
    /// [`SpawnError`]; nothing was started then.
    pub fn spawn(&self, job: Job) -> Result<Value, SpawnError> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let running = ops.1.values().filter(|r| r.is_running()).count();
        if running >= MAX_RUNNING {
            return Err(SpawnError::TooMany(running));
        }
        ops.0 += 1;
        let id = OperationId(ops.0);
        let rec = Arc::new(Record {
            id,
            kind: job.kind,
            started: Instant::now(),
            progress: Arc::new(job.progress),
            state: Mutex::new((OpState::Running, None)),
        });
        let (r, work) = (rec.clone(), job.work);
        std::thread::Builder::new()
            .name(format!("op-{}-{}", id.0, job.kind))
            .spawn(move || {
                tracing::info!(id = r.id.0, kind = r.kind, "operation started");
                let out = work(&r.progress);
                match &out {
                    Ok(_) => tracing::info!(id = r.id.0, "operation succeeded"),
                    Err(e) => tracing::warn!(id = r.id.0, error = %e, "operation failed"),
                }
                let state = match out {
                    Ok(v) => OpState::Succeeded(v),
                    Err(e) => OpState::Failed(e),
                };
                // Running --closure returned--> Succeeded / Failed
                *r.state.lock().unwrap_or_else(|p| p.into_inner()) = (state, Some(Instant::now()));
            })
            .map_err(SpawnError::Thread)?;
        let json = rec.to_json();
        ops.1.insert(id, rec);
        Self::forget_old(&mut ops.1);
        Ok(json)
    }

    /// Drop the oldest finished operations beyond [`KEEP_FINISHED`].
    fn forget_old(ops: &mut BTreeMap<OperationId, Arc<Record>>) {
        let finished: Vec<OperationId> = ops
            .values()
            .filter(|r| !r.is_running())
            .map(|r| r.id)
            .collect();
        for id in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_FINISHED))
        {
            ops.remove(id);
        }
    }

    /// One operation as JSON, if the registry still has it.
    pub fn get(&self, id: OperationId) -> Option<Value> {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.1.get(&id).map(|r| r.to_json())
    }

    /// Every operation the registry has, oldest first.
    pub fn list(&self) -> Value {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        Value::Array(ops.1.values().map(|r| r.to_json()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn wait_done(ops: &Operations, id: u64) -> Value {
        for _ in 0..500 {
            let v = ops.get(OperationId(id)).unwrap();
            if v["state"] != "running" {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("operation {id} did not finish");
    }

    #[test]
    fn progress_is_visible_while_running_and_result_after() {
        let ops = Operations::default();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (at_tx, at_rx) = mpsc::channel::<()>();
        let job = Job::new("test", "bytes", 100, move |p| {
            p.advance(40);
            at_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            p.advance(60);
            Ok(json!({ "moved": 100 }))
        });
        let v = ops.spawn(job).unwrap();
        assert_eq!(
            (v["id"].as_u64(), v["kind"].as_str()),
            (Some(1), Some("test"))
        );
        at_rx.recv().unwrap();
        let v = ops.get(OperationId(1)).unwrap();
        assert_eq!(v["state"], "running");
        assert_eq!(
            v["progress"],
            json!({"done": 40, "total": 100, "unit": "bytes"})
        );
        assert!(v.get("result").is_none());
        go_tx.send(()).unwrap();
        let v = wait_done(&ops, 1);
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["progress"]["done"], 100);
        assert_eq!(v["result"], json!({ "moved": 100 }));
        assert_eq!(ops.list().as_array().unwrap().len(), 1);
    }

    #[test]
    fn failures_are_reported_with_their_message() {
        let ops = Operations::default();
        ops.spawn(Job::new("test", "pages", 1, |_| Err("VM went away".into())))
            .unwrap();
        let v = wait_done(&ops, 1);
        assert_eq!(
            (v["state"].as_str(), v["error"].as_str()),
            (Some("failed"), Some("VM went away"))
        );
        assert!(ops.get(OperationId(2)).is_none());
    }

    #[test]
    fn running_operations_are_capped_and_finished_ones_expire() {
        let ops = Operations::default();
        let (tx, rx) = mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..MAX_RUNNING {
            let rx = rx.clone();
            ops.spawn(Job::new("block", "x", 1, move |_| {
                rx.lock().unwrap().recv().unwrap();
                Ok(Value::Null)
            }))
            .unwrap();
        }
        let e = ops.spawn(Job::new("one-more", "x", 1, |_| Ok(Value::Null)));
        assert!(matches!(e, Err(SpawnError::TooMany(n)) if n == MAX_RUNNING));
        for _ in 0..MAX_RUNNING {
            tx.send(()).unwrap();
        }
        for id in 1..=MAX_RUNNING as u64 {
            wait_done(&ops, id);
        }
        // The refused spawn took no id; the next one is MAX_RUNNING + 1.
        for i in 0..KEEP_FINISHED as u64 + 3 {
            let id = ops
                .spawn(Job::new("quick", "x", 1, |_| Ok(Value::Null)))
                .unwrap()["id"]
                .as_u64()
                .unwrap();
            assert_eq!(id, MAX_RUNNING as u64 + 1 + i);
            wait_done(&ops, id);
        }
        let list = ops.list();
        let ids: Vec<u64> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_u64().unwrap())
            .collect();
        assert!(ids.len() <= KEEP_FINISHED + 1, "{ids:?}");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
        assert!(
            ops.get(OperationId(1)).is_none(),
            "the oldest finished one expired"
        );
    }

    #[test]
    fn run_now_reports_the_result() {
        let job = Job::new("test", "bytes", 8, |p| {
            p.advance(3);
            p.set_done(8);
            Ok(json!(p.done()))
        });
        assert_eq!(job.kind(), "test");
        assert_eq!(job.run_now(), Ok(json!(8)));
    }
}
