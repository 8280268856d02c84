//! virtio 1.x devices over the virtio-mmio transport.
//!
//! ```text
//!  vCPU thread                         the VM's device I/O thread (EventManager)
//!  MMIO exit -> Bus -> MmioTransport   queue eventfd (KVM ioeventfd on
//!     registers, status, features        QueueNotify) -> VirtioDevice::process_queue
//!     QueueNotify (fallback) --write-->  -> used ring -> IrqLine (KVM irqfd)
//! ```
//!
//! A device ([`VirtioDevice`]) is a plain state machine: the transport
//! ([`mmio::MmioTransport`]) owns it and its queue configuration, and hands
//! it the queues when the driver sets DRIVER_OK. Queue work never runs on a
//! vCPU thread: a guest notification is a KVM ioeventfd (or, where KVM
//! cannot, an eventfd the transport writes) that the VMM watches on an
//! event loop of the VM's own (its device I/O thread).
//!
//! Guest memory: buffers are read and written through vm-memory's
//! [`GuestMemoryMmap`] (bounds-checked, volatile copies). A thread touching
//! guest memory may fault into the memory manager's userfaultfd handlers;
//! that is allowed (DESIGN §4.1) because no device lock is ever needed by a
//! handler. Buffers that the host kernel fills or drains directly (block
//! `pread`/`pwrite`) are pinned first through [`RamControl::pin`] (§4.10),
//! so that reclaim cannot move a folio out from under the I/O.

pub mod balloon;
pub mod block;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod mmio;
pub mod queue;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;
pub use vm_memory::GuestMemoryMmap;

/// Feature bit: the device conforms to virtio 1.x (required by virtio-mmio v2).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: used/avail event index interrupt suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Interrupt status bit: a used buffer was added.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the virtio-mmio interrupt status register
/// plus an edge trigger (a KVM irqfd in the VMM).
#[derive(Clone)]
pub struct IrqLine {
    status: Arc<AtomicU32>,
    trigger: Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>,
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqLine")
            .field("status", &self.status.load(Ordering::Relaxed))
            .finish()
    }
}

impl IrqLine {
    /// A line that raises `trigger` (e.g. writes an irqfd).
    pub fn new(trigger: impl Fn() -> std::io::Result<()> + Send + Sync + 'static) -> Self {
        IrqLine {
            status: Arc::new(AtomicU32::new(0)),
            trigger: Arc::new(trigger),
        }
    }

    /// Set `bits` in the interrupt status and raise the interrupt.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = (self.trigger)() {
            eprintln!("foliovm: warning: cannot raise virtio interrupt: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clear `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Errors from [`RamControl`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamError {
    /// The range is not guest RAM (or crosses a region boundary).
    #[error("guest range {gpa:#x}+{len:#x} is not inside guest RAM")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// No memory could be made free for the range in time (the budget is
    /// exhausted and reclaim cannot help yet). Transient: try again later.
    #[error("no memory free for guest range {gpa:#x}+{len:#x} yet")]
    NoMemory {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The memory backend refused (VM going away, poisoned page).
    #[error("memory backend: {0}")]
    Backend(String),
}

/// Something that keeps a pinned guest range in place until dropped.
pub type PinToken = Box<dyn std::any::Any + Send>;

/// What devices need from guest RAM besides reading and writing it: pins
/// for buffers that host I/O fills directly, and discards (balloon).
///
/// Implementations must not take locks that a userfaultfd handler waits
/// on: callers may hold device locks while calling.
pub trait RamControl: Send + Sync {
    /// Pin `[gpa, gpa + len)` so it stays at its host address (and is
    /// populated) until the token drops. `None` when the backend needs no pin.
    ///
    /// # Errors
    /// [`RamError`].
    fn pin(&self, gpa: u64, len: u64) -> Result<Option<PinToken>, RamError>;

    /// Give `[gpa, gpa + len)` (page aligned) back to the host: the range
    /// reads as zero afterwards. Returns the bytes that were resident and
    /// were returned.
    ///
    /// # Errors
    /// [`RamError`].
    fn discard(&self, gpa: u64, len: u64) -> Result<u64, RamError>;
}

/// A [`RamControl`] for memory that needs no pins and cannot be discarded
/// (unit tests).
#[derive(Debug, Default)]
pub struct NoRamControl;

impl RamControl for NoRamControl {
    fn pin(&self, _gpa: u64, _len: u64) -> Result<Option<PinToken>, RamError> {
        Ok(None)
    }
    fn discard(&self, _gpa: u64, _len: u64) -> Result<u64, RamError> {
        Ok(0)
    }
}

/// Queues handed to a device at DRIVER_OK.
pub struct ActiveQueues {
    /// The queues, in index order.
    pub queues: Vec<Queue>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line.
    pub irq: IrqLine,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device type, behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device id (2 = block, 5 = balloon).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Read device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start using `queues`.
    fn activate(&mut self, queues: ActiveQueues);
    /// The driver reset the device: drop the queues, keep the backing.
    fn reset(&mut self);
    /// Guest memory moved to another host mapping (region relocation):
    /// address the queues through `mem` from now on. Called with the
    /// transport locked, so never in the middle of processing a queue.
    fn set_memory(&mut self, mem: GuestMemoryMmap);
    /// The guest notified queue `index` (an ioeventfd fired), or a retry of
    /// a queue left [`QueueState::Deferred`] is due.
    fn process_queue(&mut self, index: usize) -> QueueState;
}

/// What processing a queue left in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Nothing the device put off; the next notification brings more.
    Drained,
    /// A request waits for guest memory (a pin found the budget exhausted):
    /// the queue must be processed again after a while, notified or not.
    /// The guest sees a slow request, never an error.
    Deferred,
    /// The queue was left with chains available after a drain's budget
    /// ([`queue::DRAIN_BUDGET`]): the transport notifies it again, so the
    /// event loop comes back to it after the other work waiting.
    More,
    /// The driver broke the queue (an avail index more than the queue size
    /// ahead of the device's): nothing more is served from it until the
    /// driver resets the device. The transport sets DEVICE_NEEDS_RESET and
    /// tells the driver by a configuration change interrupt (virtio 1.2
    /// §2.1.2).
    NeedsReset,
}

/// Read `data.len()` bytes of a little-endian config blob at `offset`;
/// out-of-range bytes read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// Rate limit for guest-triggered warnings: the first few of each kind are
/// printed, then every 1000th, so a hostile guest cannot flood the log.
#[derive(Debug, Default)]
pub struct WarnLimit(u64);

impl WarnLimit {
    /// Print `msg` (prefixed) if this occurrence is within the limit.
    pub fn warn(&mut self, msg: impl FnOnce() -> String) {
        self.0 += 1;
        if self.0 <= 10 || self.0.is_multiple_of(1000) {
            eprintln!("foliovm: warning: {} (occurrence {})", msg(), self.0);
        }
    }

    /// How many warnings were raised.
    pub fn count(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_line_sets_and_acks_status() {
        let fired = Arc::new(AtomicU32::new(0));
        let f = fired.clone();
        let irq = IrqLine::new(move || {
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        irq.signal(INT_USED_RING);
        irq.signal(INT_CONFIG);
        assert_eq!(irq.status(), 3);
        assert_eq!(fired.load(Ordering::SeqCst), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG);
    }

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
