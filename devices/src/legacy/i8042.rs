//! The i8042 keyboard controller, for its one job in a microVM: the guest's
//! `reboot` (with `reboot=k`) writes 0xfe to port 0x64, which ends the VM.

use crate::{BusDevice, EventFdTrigger};
use vm_superio::I8042Device;

/// i8042 at ports 0x60-0x64 (placed at 0x60 with length 5).
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042 {
            inner: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b, rest @ ..] = data {
            *b = self.inner.read(offset as u8);
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b, ..] = data {
            // The only error is a failed eventfd write, which would mean the
            // VMM is already tearing down.
            let _ = self.inner.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let t = EventFdTrigger::new().unwrap();
        let fd = t.0.try_clone().unwrap();
        let mut k = I8042::new(t);
        k.write(4, &[0xfe]);
        assert_eq!(fd.read().unwrap(), 1);
    }
}
