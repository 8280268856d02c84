//! The 8250 UART at 0x3f8 / IRQ 4, on vm-superio, and the stdin feeder.

use crate::{BusDevice, EventFdTrigger};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;

/// The COM1 UART, writing guest output to `W`.
pub struct SerialDevice<W: Write + Send> {
    inner: Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFdTrigger, out: W) -> Self {
        SerialDevice {
            inner: Serial::new(irq, out),
        }
    }

    /// Queue bytes typed by the user for the guest to read.
    ///
    /// Returns how many were queued (the FIFO may be full).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        // A full FIFO drops the rest, like a real UART with no flow control.
        let room = self.inner.fifo_capacity();
        let n = bytes.len().min(room);
        self.inner
            .enqueue_raw_bytes(&bytes[..n])
            .unwrap_or_default()
    }

    /// The output sink.
    pub fn writer(&self) -> &W {
        self.inner.writer()
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b, rest @ ..]) = (u8::try_from(offset), data) {
            *b = self.inner.read(off);
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b, ..]) = (u8::try_from(offset), data) {
            // Output errors (a closed stdout) must not stop the guest.
            let _ = self.inner.write(off, *b);
        }
    }
}

/// Feeds the host's stdin into the serial device, as an event-manager subscriber.
pub struct SerialInput<W: Write + Send + 'static> {
    serial: Arc<Mutex<SerialDevice<W>>>,
    input: std::fs::File,
}

impl<W: Write + Send + 'static> SerialInput<W> {
    /// Read from `input` (normally a dup of stdin) into `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice<W>>>, input: std::fs::File) -> Self {
        SerialInput { serial, input }
    }
}

impl<W: Write + Send + 'static> MutEventSubscriber for SerialInput<W> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or error: stop watching stdin; the guest keeps running.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                self.serial
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .enqueue_input(&buf[..n]);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(self.input.as_raw_fd(), EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_writer_and_input_is_readable() {
        let irq = EventFdTrigger::new().unwrap();
        let mut s = SerialDevice::new(irq, Vec::new());
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(s.writer(), b"hi");
        // Enable the receive-data interrupt (IER bit 0), then type a byte.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 1, 0, "data ready");
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'x');
        assert_eq!(
            s.inner.interrupt_evt().0.read().unwrap(),
            1,
            "irq raised on input"
        );
    }
}
