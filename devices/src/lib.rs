//! foliovm devices.
//!
//! A device is a plain state machine with `read(offset, data)` and
//! `write(offset, data)` ([`BusDevice`]) placed on a [`Bus`]; interrupts go out
//! through eventfds that the VMM registers as KVM irqfds.

pub mod bus;
pub mod legacy;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
/// What devices raise their lines through (for the VMM's own lines).
pub use vm_superio::Trigger;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt or event line backed by an eventfd (a KVM irqfd for
/// interrupts, or a VMM-internal event such as reset).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    /// A new non-blocking eventfd trigger.
    ///
    /// # Errors
    /// The eventfd syscall's error.
    pub fn new() -> std::io::Result<Self> {
        Ok(EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
