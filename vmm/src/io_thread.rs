//! A VM's device I/O thread, `vm-<name>-io`: its own event loop, serving
//! that VM's virtio devices only: queue notifications (KVM ioeventfds),
//! the retry timers of deferred queues and the balloon's side jobs. A
//! slow request of one VM (an fdatasync, a large read, a discard waiting
//! for memory) then holds up that VM's devices, not the other VMs' nor
//! the process's shared event loop (API, signals, VM control). Like Cloud
//! Hypervisor's per-device threads, with one thread per VM.
//!
//! ```text
//! new() --> Built --start()--> Running --request_exit()--> Exiting --join()--> Joined
//!             |                    |                                            ^
//!             +--------------------+----------------join()----------------------+
//! ```
//!
//! The thread writes guest memory (a drive's read, a used ring), so it must
//! be joined before that memory is given back or unmapped; see the
//! teardown order in [`crate::vm`]. Asking it to exit does not cut a
//! request short: the request it is serving completes (the devices run a
//! request to its end under their transport's lock), then the thread
//! leaves its loop and drops its event manager, and with it the
//! subscribers. Nothing of the devices runs on it after [`IoThread::join`].

use crate::stop::{ExitReason, StopSignal};
use crate::vmm::Subscriber;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A VM's device I/O thread, in one of its states.
pub struct IoThread {
    /// The thread's name, `vm-<name>-io`.
    name: String,
    state: State,
}

enum State {
    /// Devices subscribe to the event manager; no thread yet.
    Built(EventManager<Subscriber>),
    /// The thread serves the devices until `exit` is written.
    Running {
        exit: EventFd,
        thread: JoinHandle<()>,
    },
    /// Asked to exit; it may still be finishing the request it serves.
    Exiting(JoinHandle<()>),
    /// Joined (or never started): no device work runs on it any more.
    Joined,
}

/// Tells the thread's loop to end, from its own event manager.
struct ExitWatch {
    evt: EventFd,
    exit: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.exit.store(true, Ordering::Relaxed);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A loop that cannot be told to exit could never be joined.
        ops.add(Events::new_raw(self.evt.as_raw_fd(), EventSet::IN))
            .expect("a fresh eventfd registers with a fresh epoll");
    }
}

impl IoThread {
    /// A device loop for the VM `vm_name`, not started yet.
    ///
    /// # Errors
    /// The OS error creating the epoll instance.
    pub fn new(vm_name: &str) -> std::io::Result<Self> {
        let events =
            EventManager::<Subscriber>::new().map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(IoThread {
            name: format!("vm-{vm_name}-io"),
            state: State::Built(events),
        })
    }

    /// The event manager the devices subscribe to, until the thread starts.
    pub fn events(&mut self) -> Option<&mut EventManager<Subscriber>> {
        match &mut self.state {
            State::Built(events) => Some(events),
            _ => None,
        }
    }

    /// Start the thread. Its loop failing or a device panicking on it
    /// stops the VM through `stop`, with a reason. Nothing if it was
    /// started before.
    ///
    /// # Errors
    /// The OS error creating the exit eventfd or spawning the thread.
    pub fn start(&mut self, stop: Arc<StopSignal>) -> std::io::Result<()> {
        let State::Built(_) = &self.state else {
            return Ok(());
        };
        let exit = EventFd::new(libc::EFD_NONBLOCK)?;
        let watch = ExitWatch {
            evt: exit.try_clone()?,
            exit: Arc::new(AtomicBool::new(false)),
        };
        // Built --start()--> Running
        let State::Built(mut events) = std::mem::replace(&mut self.state, State::Joined) else {
            unreachable!("checked above");
        };
        let done = watch.exit.clone();
        events.add_subscriber(Arc::new(Mutex::new(watch)));
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || serve(&name, events, &done, &stop))?;
        self.state = State::Running { exit, thread };
        Ok(())
    }

    /// Ask the thread to exit once the request it serves (if any) is
    /// done; returns at once. Nothing if it was asked before or never ran.
    pub fn request_exit(&mut self) {
        // Running --request_exit()--> Exiting
        if let State::Running { exit, .. } = &self.state {
            // A full eventfd counter still wakes the loop.
            let _ = exit.write(1);
            let State::Running { thread, .. } = std::mem::replace(&mut self.state, State::Joined)
            else {
                unreachable!("matched above");
            };
            self.state = State::Exiting(thread);
        }
    }

    /// Whether nothing runs on the thread any more: never started, or
    /// asked to exit and gone (then it is joined here, which is at once).
    pub fn try_join(&mut self) -> bool {
        match &self.state {
            State::Running { .. } => false,
            State::Exiting(t) if !t.is_finished() => false,
            _ => {
                self.join();
                true
            }
        }
    }

    /// Ask the thread to exit and wait for it: it finishes the request it
    /// serves first, however long that takes. Once this returns, no device
    /// work of the VM runs on it. A never-started loop is dropped here.
    pub fn join(&mut self) {
        self.request_exit();
        // Exiting --join()--> Joined; Built --join()--> Joined.
        if let State::Exiting(thread) = std::mem::replace(&mut self.state, State::Joined) {
            if thread.join().is_err() {
                // `serve` catches panics; the stop reason is already set.
                tracing::error!(thread = %self.name, "device I/O thread panicked");
            }
        }
    }
}

impl Drop for IoThread {
    /// A VM dropped without being concluded still never frees guest memory
    /// under its I/O thread: this runs before the guest RAM field drops.
    fn drop(&mut self) {
        self.join();
    }
}

/// The thread's body: serve the devices until told to exit.
fn serve(name: &str, mut events: EventManager<Subscriber>, exit: &AtomicBool, stop: &StopSignal) {
    let failed = crate::catch_panic(|| {
        while !exit.load(Ordering::Relaxed) {
            // EINTR comes back as a round with no events.
            if let Err(e) = events.run() {
                return Some(format!("{name}: device event loop failed: {e}"));
            }
        }
        None
    })
    .unwrap_or_else(|what| Some(format!("{name}: a device panicked: {what}")));
    if let Some(why) = failed {
        tracing::error!("{why}");
        // The VM's devices are no longer served: it stops, the others go on.
        stop.request(ExitReason::Error(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    /// Counts an eventfd's wake-ups; `slow` makes each take that long.
    struct Counter {
        evt: EventFd,
        seen: Arc<AtomicU32>,
        slow: Duration,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            std::thread::sleep(self.slow);
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new_raw(self.evt.as_raw_fd(), EventSet::IN))
                .unwrap();
        }
    }

    fn counter(io: &mut IoThread, slow: Duration) -> (EventFd, Arc<AtomicU32>) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU32::new(0));
        io.events()
            .unwrap()
            .add_subscriber(Arc::new(Mutex::new(Counter {
                evt: evt.try_clone().unwrap(),
                seen: seen.clone(),
                slow,
            })));
        (evt, seen)
    }

    /// The thread carries its VM's name, serves its subscribers, and a
    /// join waits for the event it is in the middle of: after `join`
    /// nothing runs on it, and the work it started was finished, not cut.
    #[test]
    fn a_join_waits_for_the_request_in_progress() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut io = IoThread::new("t").unwrap();
        let (evt, seen) = counter(&mut io, Duration::from_millis(300));
        io.start(stop.clone()).unwrap();
        let State::Running { thread, .. } = &io.state else {
            panic!("not running");
        };
        assert_eq!(thread.thread().name(), Some("vm-t-io"));
        evt.write(1).unwrap();
        // The request is in progress (sleeping) ...
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        io.request_exit();
        assert!(!io.try_join(), "the thread left in the middle of a request");
        // ... and completes before the join returns.
        io.join();
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert!(io.try_join());
        // Nothing serves the subscriber any more.
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert!(!stop.is_stopping(), "a clean exit is no stop reason");
    }

    /// A device that panics on the thread stops its VM with a reason,
    /// rather than leave it running with no device served.
    #[test]
    fn a_device_panic_stops_the_vm() {
        struct Panics(EventFd);
        impl MutEventSubscriber for Panics {
            fn process(&mut self, _: Events, _: &mut EventOps) {
                panic!("test device bug");
            }
            fn init(&mut self, ops: &mut EventOps) {
                ops.add(Events::new_raw(self.0.as_raw_fd(), EventSet::IN))
                    .unwrap();
            }
        }
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut io = IoThread::new("p").unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        io.events()
            .unwrap()
            .add_subscriber(Arc::new(Mutex::new(Panics(evt.try_clone().unwrap()))));
        io.start(stop.clone()).unwrap();
        evt.write(1).unwrap();
        let start = Instant::now();
        while !stop.is_stopping() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the VM was not stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let why = stop.reason().unwrap().to_string();
        assert!(
            why.contains("vm-p-io: a device panicked: test device bug"),
            "{why}"
        );
        io.join();
    }

    /// A loop that never started is dropped without a thread to wait for.
    #[test]
    fn a_never_started_loop_joins_at_once() {
        let mut io = IoThread::new("n").unwrap();
        let _ = counter(&mut io, Duration::ZERO);
        assert!(io.try_join());
        assert!(io.events().is_none());
    }
}
