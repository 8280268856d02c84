//! The virtio-mmio transport, version 2 (virtio 1.x, "modern"): a register
//! window of 4 KiB per device. Analogue of Linux `drivers/virtio/virtio_mmio.c`
//! seen from the device side.
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x000 | MagicValue `virt` | R |
//! | 0x004 | Version (2) | R |
//! | 0x008 | DeviceID | R |
//! | 0x00c | VendorID | R |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | R / W |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W |
//! | 0x030 | QueueSel | W |
//! | 0x034 | QueueNumMax | R |
//! | 0x038 | QueueNum | W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify | W |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
//! | 0x070 | Status | RW |
//! | 0x080..0x0a4 | QueueDesc, QueueDriver, QueueDevice (low, high) | W |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | device configuration | RW |
//!
//! Device status lifecycle (virtio 1.x §3.1), as the transport enforces it:
//! `Reset --ACK,DRIVER--> Negotiating --FEATURES_OK--> FeaturesOk
//! --DRIVER_OK--> Live`; a write of 0 from any state resets. A write that
//! would clear a bit (which a driver must not do, §2.1.2) is ignored.

use super::{
    ActiveQueues, GuestMemoryMmap, IrqLine, QueueState, VirtioDevice, WarnLimit, VIRTIO_F_VERSION_1,
};
use crate::BusDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Size of a device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM places a KVM ioeventfd per queue.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4f4c_4f46; // "FOLO"

pub(crate) const S_ACKNOWLEDGE: u32 = 1;
pub(crate) const S_DRIVER: u32 = 2;
pub(crate) const S_DRIVER_OK: u32 = 4;
pub(crate) const S_FEATURES_OK: u32 = 8;
/// Set by the device: it hit an error only a reset clears (virtio 1.2
/// §2.1). (FAILED, 128, is the driver's to set.)
pub(crate) const S_NEEDS_RESET: u32 = 64;

/// Queue configuration the driver writes before DRIVER_OK.
struct QueueSlot {
    queue: Queue,
    /// QueueNum and the ring addresses as the driver wrote them. They go
    /// into `queue` at DRIVER_OK, where one the queue cannot take fails
    /// the device: `Queue`'s setters drop such a value silently, which
    /// would leave the queue at its maximum size or a ring at its old
    /// address (guest address 0), not where the driver put it.
    regs: QueueRegs,
    /// Notification eventfd (also a KVM ioeventfd on QueueNotify).
    notify: EventFd,
    /// The driver broke the queue ([`QueueState::NeedsReset`]): it is not
    /// processed again until a reset.
    broken: bool,
}

/// A queue's QueueNum and ring address registers, as written.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    /// The reset values: the maximum size, rings at 0.
    fn new(max: u16) -> Self {
        QueueRegs {
            size: max,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Put these values into `queue`.
    fn apply(&self, queue: &mut Queue) -> Result<(), virtio_queue::Error> {
        queue.try_set_size(self.size)?;
        queue.try_set_desc_table_address(GuestAddress(self.desc))?;
        queue.try_set_avail_ring_address(GuestAddress(self.avail))?;
        queue.try_set_used_ring_address(GuestAddress(self.used))
    }
}

/// Why DRIVER_OK found a queue unusable.
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    /// QueueNum or a ring address the queue cannot take (not a power of
    /// two, above the maximum, a misaligned ring).
    #[error("queue {index}: {source}")]
    Register {
        /// Queue index.
        index: usize,
        /// What virtio-queue refused.
        source: virtio_queue::Error,
    },
    /// A ring is not inside guest RAM.
    #[error("queue {index}: a ring (size {size}) is not inside guest RAM")]
    Inaccessible {
        /// Queue index.
        index: usize,
        /// Queue size.
        size: u16,
    },
}

/// A virtio device's MMIO register window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: IrqLine,
    queues: Vec<QueueSlot>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// Whether the device holds the queues (DRIVER_OK was accepted).
    live: bool,
    /// Rate limit for warnings about the driver.
    warn: WarnLimit,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`. `notify[i]` is signalled when the driver
    /// notifies queue `i`; there must be one per queue.
    ///
    /// # Panics
    /// If `notify` does not have one eventfd per queue, or the device does
    /// not offer VIRTIO_F_VERSION_1 (programming errors).
    pub fn new(device: D, mem: GuestMemoryMmap, irq: IrqLine, notify: Vec<EventFd>) -> Self {
        let sizes = device.queue_max_sizes().to_vec();
        assert_eq!(sizes.len(), notify.len(), "one notify eventfd per queue");
        assert!(device.features() & (1 << VIRTIO_F_VERSION_1) != 0);
        let queues = sizes
            .iter()
            .zip(notify)
            .map(|(&max, notify)| QueueSlot {
                queue: Queue::new(max).expect("queue sizes are powers of two"),
                regs: QueueRegs::new(max),
                notify,
                broken: false,
            })
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            live: false,
            warn: WarnLimit::default(),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (queue processing, control from the VMM).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The interrupt line.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    /// The notification eventfds, for the event loop and KVM ioeventfds.
    pub fn notify_fds(&self) -> impl Iterator<Item = &EventFd> {
        self.queues.iter().map(|q| &q.notify)
    }

    /// Signal a configuration change to the driver.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & S_DRIVER_OK != 0 {
            self.irq.signal(super::INT_CONFIG);
        }
    }

    /// Whether the driver has set DRIVER_OK and the device is running.
    pub fn is_live(&self) -> bool {
        self.live
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        // Queue registers are frozen once the device is live.
        if self.live {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |s| u32::from(s.queue.max_size())),
            0x044 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |s| u32::from(s.queue.ready())),
            0x060 => self.irq.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            // SHMLenLow/High: no shared memory regions.
            0x0b0 | 0x0b4 => u32::MAX,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_sel = v,
            0x024 => self.driver_features_sel = v,
            0x020 if self.status & S_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(s) = self.selected() {
                    // Checked at DRIVER_OK (a value above u16 is no size).
                    s.regs.size = u16::try_from(v).unwrap_or(0);
                }
            }
            0x044 => {
                if let Some(s) = self.selected() {
                    s.queue.set_ready(v == 1);
                }
            }
            0x050 => {
                if let Some(s) = self.queues.get(v as usize) {
                    // Only reached when KVM has no ioeventfd for this write.
                    let _ = s.notify.write(1);
                }
            }
            0x064 => self.irq.ack(v),
            0x070 => self.write_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.write_queue_addr(offset, v),
            _ => {}
        }
    }

    fn write_queue_addr(&mut self, offset: u64, v: u32) {
        let Some(s) = self.selected() else { return };
        let addr = match offset & !4 {
            0x080 => &mut s.regs.desc,
            0x090 => &mut s.regs.avail,
            _ => &mut s.regs.used,
        };
        // Checked at DRIVER_OK, once both halves are in.
        *addr = if offset & 4 == 0 {
            (*addr & !0xffff_ffff) | u64::from(v)
        } else {
            (*addr & 0xffff_ffff) | (u64::from(v) << 32)
        };
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & self.status != self.status {
            // Clearing DRIVER_OK and setting it again would activate a
            // live device a second time, with unconfigured queues.
            let (ty, old) = (self.device.device_type(), self.status);
            self.warn.warn(|| {
                format!("virtio device type {ty}: driver wrote status {v:#x} over {old:#x}, clearing bits; ignored")
            });
            return;
        }
        let new = v & !self.status;
        let mut v = v;
        if new & S_FEATURES_OK != 0 {
            // Reset --ACK,DRIVER--> Negotiating --FEATURES_OK--> FeaturesOk,
            // only for a subset of what we offer that includes VERSION_1.
            let ok = self.status & (S_ACKNOWLEDGE | S_DRIVER) == (S_ACKNOWLEDGE | S_DRIVER)
                && self.driver_features & !self.device.features() == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Not taken; a DRIVER_OK in the same write comes before
                // FEATURES_OK then, and is refused below.
                v &= !S_FEATURES_OK;
            }
        }
        if new & S_DRIVER_OK != 0 {
            // FeaturesOk --DRIVER_OK--> Live, if every ready queue is valid.
            let refused = if self.status & S_FEATURES_OK == 0 {
                Some("before FEATURES_OK".to_string())
            } else {
                self.activate()
                    .err()
                    .map(|e| format!("with an invalid {e}"))
            };
            if let Some(why) = refused {
                // DRIVER_OK is not taken, so no interrupt: the driver sees
                // the bit when it reads the status.
                self.status |= S_NEEDS_RESET;
                let ty = self.device.device_type();
                self.warn
                    .warn(|| format!("virtio device type {ty}: driver set DRIVER_OK {why}"));
                return;
            }
        }
        self.status = v;
    }

    fn activate(&mut self) -> Result<(), QueueSetupError> {
        let mem = &self.mem;
        for (index, s) in self.queues.iter_mut().enumerate() {
            if !s.queue.ready() {
                continue;
            }
            s.regs
                .apply(&mut s.queue)
                .map_err(|source| QueueSetupError::Register { index, source })?;
            if !s.queue.is_valid(mem) {
                return Err(QueueSetupError::Inaccessible {
                    index,
                    size: s.queue.size(),
                });
            }
        }
        let event_idx = self.driver_features & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0;
        // The device takes the configured queues; the transport keeps
        // fresh ones of the same maximum size for after a reset.
        let queues = self
            .queues
            .iter_mut()
            .map(|s| {
                s.queue.set_event_idx(event_idx);
                let fresh = Queue::new(s.queue.max_size()).expect("same size as before");
                std::mem::replace(&mut s.queue, fresh)
            })
            .collect();
        self.device.activate(ActiveQueues {
            queues,
            mem: self.mem.clone(),
            irq: self.irq.clone(),
            acked_features: self.driver_features,
        });
        self.live = true;
        // Drivers may add buffers and notify before DRIVER_OK (Linux primes
        // the balloon's stats queue in probe); those notifications found
        // the device not live. Have the event loop look at every queue once.
        for s in &self.queues {
            let _ = s.notify.write(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        // Any state --0--> Reset.
        if self.live {
            self.device.reset();
        }
        self.live = false;
        for s in &mut self.queues {
            s.queue.reset();
            s.regs = QueueRegs::new(s.queue.max_size());
            s.broken = false;
            // Drain a notification that raced with the reset.
            let _ = s.notify.read();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.irq.ack(u32::MAX);
    }

    /// An event-loop notification for queue `index` (or a due retry of a
    /// deferred one): consume it and let the device process the queue. A
    /// queue the device left [`QueueState::More`] is notified again.
    pub fn notified(&mut self, index: usize) -> QueueState {
        let Some(s) = self.queues.get(index) else {
            return QueueState::Drained;
        };
        let _ = s.notify.read();
        if !self.live || s.broken {
            return QueueState::Drained;
        }
        let state = self.device.process_queue(index);
        match state {
            QueueState::More => _ = self.queues[index].notify.write(1),
            QueueState::NeedsReset => {
                self.queues[index].broken = true;
                self.needs_reset();
            }
            QueueState::Drained | QueueState::Deferred => {}
        }
        state
    }

    /// The device hit an error only a reset clears: set DEVICE_NEEDS_RESET
    /// and, the device being live (DRIVER_OK), send a configuration change
    /// notification, as virtio 1.2 §2.1.2 requires. Once per reset.
    fn needs_reset(&mut self) {
        if self.status & S_NEEDS_RESET != 0 {
            return;
        }
        self.status |= S_NEEDS_RESET;
        if self.status & S_DRIVER_OK != 0 {
            self.irq.signal(super::INT_CONFIG);
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // Registers are 32-bit; anything else reads as zero.
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// A transport whose guest memory can be switched (region relocation),
/// type-erased so that the VMM can hold every device's.
pub trait MemorySwitch: Send {
    /// Use `mem` from now on, for the transport's queue checks and the
    /// device's queues.
    fn set_memory(&mut self, mem: GuestMemoryMmap);
    /// The VM stopped and its memory is given back: reset the device, as
    /// if the driver had, so that nothing (a notification, a retry or
    /// statistics timer, an API request) makes it touch guest memory
    /// again. Until the VM's driver sets it up again, which it never will.
    fn stop(&mut self);
}

impl<D: VirtioDevice> MemorySwitch for MmioTransport<D> {
    fn set_memory(&mut self, mem: GuestMemoryMmap) {
        if self.live {
            self.device.set_memory(mem.clone());
        }
        self.mem = mem;
    }

    fn stop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing::memory;
    use std::sync::{Arc, Mutex};

    /// The status of a live device: every step up to DRIVER_OK.
    const LIVE: u32 = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Probe {
        activated: Option<usize>,
        activations: usize,
        resets: usize,
        memory_switches: usize,
        processed: Vec<usize>,
        /// What `process_queue` answers.
        state: Option<QueueState>,
        config: [u8; 8],
    }

    struct ProbeDev(Arc<Mutex<Probe>>);

    impl VirtioDevice for ProbeDev {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.0.lock().unwrap().config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut p = self.0.lock().unwrap();
            p.config[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        fn activate(&mut self, q: ActiveQueues) {
            let mut p = self.0.lock().unwrap();
            p.activated = Some(q.queues.len());
            p.activations += 1;
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn set_memory(&mut self, _mem: GuestMemoryMmap) {
            self.0.lock().unwrap().memory_switches += 1;
        }
        fn process_queue(&mut self, index: usize) -> QueueState {
            let mut p = self.0.lock().unwrap();
            p.processed.push(index);
            p.state.unwrap_or(QueueState::Drained)
        }
    }

    fn transport() -> (MmioTransport<ProbeDev>, Arc<Mutex<Probe>>) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let fds = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let t = MmioTransport::new(
            ProbeDev(p.clone()),
            memory(),
            IrqLine::new(|| Ok(())),
            fds.collect(),
        );
        (t, p)
    }

    fn rd(t: &mut MmioTransport<ProbeDev>, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport<ProbeDev>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// The Linux driver's probe sequence, with the queue at `base`.
    fn setup_queue(t: &mut MmioTransport<ProbeDev>, sel: u32, base: u64) {
        wr(t, 0x030, sel);
        wr(t, 0x038, 16);
        wr(t, 0x080, base as u32);
        wr(t, 0x084, 0);
        wr(t, 0x090, (base + 0x100) as u32);
        wr(t, 0x0a0, (base + 0x200) as u32);
        wr(t, 0x044, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, 0x000), 0x7472_6976);
        assert_eq!(rd(&mut t, 0x004), 2);
        assert_eq!(rd(&mut t, 0x008), 42);
        wr(&mut t, 0x030, 1);
        assert_eq!(rd(&mut t, 0x034), 8);
        wr(&mut t, 0x030, 7);
        assert_eq!(rd(&mut t, 0x034), 0, "a missing queue has size 0");
        wr(&mut t, 0x014, 1);
        assert_eq!(rd(&mut t, 0x010), 1, "VERSION_1 is bit 32");
        wr(&mut t, 0x014, 0);
        assert_eq!(rd(&mut t, 0x010), 1 << 3);
        // Odd widths and offsets read as zero and do not panic.
        let mut b = [0xffu8; 2];
        t.read(0x002, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x071, &[1]);
    }

    #[test]
    fn negotiation_and_activation() {
        let (mut t, p) = transport();
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(&mut t, 0x024, 0);
        wr(&mut t, 0x020, 1 << 3);
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(rd(&mut t, 0x070) & S_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, 0x070, LIVE);
        assert!(t.is_live());
        assert_eq!(p.lock().unwrap().activated, Some(2));
        // A memory switch reaches a live device (not a reset one, below).
        MemorySwitch::set_memory(&mut t, memory());
        assert_eq!(p.lock().unwrap().memory_switches, 1);
        // Activation asks the loop to look at every queue once.
        for q in &t.queues {
            assert_eq!(q.notify.read().unwrap(), 1);
        }
        // A notification reaches the device via its eventfd and the loop.
        wr(&mut t, 0x050, 1);
        assert_eq!(t.queues[1].notify.read().unwrap(), 1);
        t.notified(1);
        assert_eq!(p.lock().unwrap().processed, vec![1]);
        // Reset.
        wr(&mut t, 0x070, 0);
        assert!(!t.is_live());
        assert_eq!(p.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, 0x070), 0);
        t.notified(0);
        assert_eq!(p.lock().unwrap().processed, vec![1], "not live: no work");
        // The VMM stops a live device the same way when its VM stops.
        let (mut stopped, sp) = live_transport();
        MemorySwitch::stop(&mut stopped);
        assert!(!stopped.is_live());
        assert_eq!(sp.lock().unwrap().resets, 1);
        stopped.notified(0);
        assert!(sp.lock().unwrap().processed.is_empty(), "stopped: no work");
        MemorySwitch::set_memory(&mut t, memory());
        assert_eq!(
            p.lock().unwrap().memory_switches,
            1,
            "not live: kept for activation"
        );
    }

    #[test]
    fn features_we_do_not_offer_are_refused() {
        let (mut t, _) = transport();
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(&mut t, 0x024, 0);
        wr(&mut t, 0x020, 1 << 5);
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x070) & S_FEATURES_OK, 0);
        // Legacy drivers (no VERSION_1) are refused too.
        let (mut t, _) = transport();
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, 0x020, 1 << 3);
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x070) & S_FEATURES_OK, 0);
    }

    #[test]
    fn an_invalid_queue_fails_the_device() {
        let (mut t, p) = transport();
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        // Descriptor table outside guest memory.
        setup_queue(&mut t, 0, 0x7000_0000);
        wr(&mut t, 0x070, LIVE);
        assert!(!t.is_live());
        assert_ne!(rd(&mut t, 0x070) & S_NEEDS_RESET, 0);
        assert_eq!(p.lock().unwrap().activated, None);
        // DRIVER_OK without FEATURES_OK fails as well.
        let (mut t, _) = transport();
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
        assert!(!t.is_live());
    }

    /// Probe a transport up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport<ProbeDev>) {
        wr(t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        wr(t, 0x024, 1);
        wr(t, 0x020, 1);
        wr(t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    }

    /// A transport whose driver negotiated, set queue 0 up at 0x1000 and
    /// set DRIVER_OK.
    fn live_transport() -> (MmioTransport<ProbeDev>, Arc<Mutex<Probe>>) {
        let (mut t, p) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, 0x070, LIVE);
        (t, p)
    }

    /// A queue size or ring address that the queue cannot take (not a
    /// power of two, above the maximum, zero; a misaligned ring) fails
    /// the device at DRIVER_OK. It used to be dropped silently: the device
    /// went live with the maximum size, or a ring at the old address
    /// (guest address 0), and wrote used elements past the driver's ring
    /// or over guest memory the driver never gave it.
    #[test]
    fn a_queue_register_value_the_queue_cannot_take_fails_the_device() {
        let bad: [(u64, u32); 7] = [
            (0x038, 10),
            (0x038, 32),
            (0x038, 0),
            (0x080, 0x1008),
            (0x090, 0x1101),
            (0x0a0, 0x1202),
            (0x084, 0),
        ];
        for (i, (reg, v)) in bad.into_iter().enumerate() {
            let (mut t, p) = transport();
            negotiate(&mut t);
            setup_queue(&mut t, 0, 0x1000);
            wr(&mut t, 0x044, 0);
            wr(&mut t, reg, v);
            wr(&mut t, 0x044, 1);
            wr(&mut t, 0x070, LIVE);
            if i == 6 {
                // A valid write (the high half of an aligned address).
                assert!(t.is_live(), "a valid write");
                continue;
            }
            assert!(!t.is_live(), "register {reg:#x} = {v:#x} was accepted");
            assert_ne!(rd(&mut t, 0x070) & S_NEEDS_RESET, 0);
            assert_eq!(p.lock().unwrap().activated, None);
        }
        // A bad value the driver then corrects is fine.
        let (mut t, _) = transport();
        negotiate(&mut t);
        wr(&mut t, 0x038, 10);
        wr(&mut t, 0x080, 0x1008);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, 0x070, LIVE);
        assert!(t.is_live());
    }

    /// A status write that sets FEATURES_OK and DRIVER_OK at once, with
    /// features the device refuses, takes neither: the device is not
    /// live, so its status must not say DRIVER_OK without
    /// DEVICE_NEEDS_RESET. It took DRIVER_OK (status 0x7) without
    /// activating the device, and the driver's next FEATURES_OK then made
    /// the status read as live with nothing serving its queues.
    #[test]
    fn driver_ok_with_refused_features_is_not_taken() {
        let (mut t, p) = transport();
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        wr(&mut t, 0x020, 1 << 3);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, 0x070, LIVE);
        let status = rd(&mut t, 0x070);
        assert!(!t.is_live());
        assert_eq!(p.lock().unwrap().activated, None);
        assert_eq!(
            status & (S_DRIVER_OK | S_NEEDS_RESET),
            S_NEEDS_RESET,
            "status {status:#x}"
        );
    }

    /// A live device's driver that clears DRIVER_OK and sets it again
    /// does not activate the device a second time. It did: the device
    /// dropped its queues for the transport's fresh, unconfigured ones
    /// (rings at guest address 0), and served those.
    #[test]
    fn driver_ok_cleared_and_set_again_does_not_reactivate() {
        let (mut t, p) = live_transport();
        assert!(t.is_live());
        wr(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x070), LIVE, "a status bit cannot be cleared");
        wr(&mut t, 0x070, LIVE);
        wr(&mut t, 0x070, S_ACKNOWLEDGE);
        wr(&mut t, 0x070, LIVE);
        assert!(t.is_live());
        assert_eq!(p.lock().unwrap().activations, 1);
        // A reset still works, and the device can be set up again.
        wr(&mut t, 0x070, 0);
        assert!(!t.is_live());
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, 0x070, LIVE);
        assert_eq!(p.lock().unwrap().activations, 2);
    }

    /// Queue registers written while the device is live (a size that is
    /// no size, rings elsewhere, QueueReady off) change nothing: the
    /// device keeps the queues it was given, and the transport's copy is
    /// untouched until a reset.
    #[test]
    fn queue_registers_are_frozen_while_live() {
        let (mut t, p) = live_transport();
        assert!(t.is_live());
        let before = t.queues[0].regs;
        for (reg, v) in [
            (0x038, 3),
            (0x038, 0),
            (0x080, 0x7000_0001),
            (0x094, 0xffff_ffff),
            (0x0a0, 0x3),
            (0x044, 0),
        ] {
            wr(&mut t, 0x030, 0);
            wr(&mut t, reg, v);
        }
        let after = t.queues[0].regs;
        assert_eq!(
            (after.size, after.desc, after.avail, after.used),
            (before.size, before.desc, before.avail, before.used)
        );
        assert!(t.is_live());
        assert_eq!(p.lock().unwrap().activations, 1);
    }

    /// A queue the device left with more chains than one drain serves is
    /// notified again by the transport, so the event loop comes back to
    /// it (after the other work waiting) without a guest kick.
    #[test]
    fn a_queue_left_with_more_work_is_notified_again() {
        let (mut t, p) = live_transport();
        t.notified(1);
        assert!(t.queues[1].notify.read().is_err(), "consumed");
        p.lock().unwrap().state = Some(QueueState::More);
        assert_eq!(t.notified(1), QueueState::More);
        assert_eq!(t.queues[1].notify.read().unwrap(), 1);
        p.lock().unwrap().state = Some(QueueState::Deferred);
        t.notified(1);
        assert!(t.queues[1].notify.read().is_err(), "retried on a timer");
    }

    /// A queue the driver broke sets DEVICE_NEEDS_RESET, once, with a
    /// configuration change interrupt; the driver's reset clears it.
    #[test]
    fn a_broken_queue_asks_the_driver_for_a_reset() {
        let (mut t, p) = live_transport();
        let g = rd(&mut t, 0x0fc);
        p.lock().unwrap().state = Some(QueueState::NeedsReset);
        assert_eq!(t.notified(1), QueueState::NeedsReset);
        let status = rd(&mut t, 0x070);
        assert_eq!(status, LIVE | S_NEEDS_RESET);
        assert_eq!(rd(&mut t, 0x060), super::super::INT_CONFIG);
        assert_eq!(rd(&mut t, 0x0fc), g, "the configuration did not change");
        wr(&mut t, 0x064, super::super::INT_CONFIG);
        t.notified(1);
        assert_eq!(rd(&mut t, 0x060), 0, "one interrupt");
        // The driver's writes of the status keep the bit (Linux ORs into
        // what it reads), and only a reset clears it.
        wr(&mut t, 0x070, status | 128);
        assert_eq!(rd(&mut t, 0x070), status | 128);
        wr(&mut t, 0x070, 0);
        assert_eq!(rd(&mut t, 0x070), 0);
        assert!(!t.is_live());
    }

    /// A queue the driver broke is not served again until a reset, also
    /// when the driver puts its avail index back (as QueueState::NeedsReset
    /// says); the device's other queues are still served. It was served
    /// again at the next notification.
    #[test]
    fn a_broken_queue_is_not_served_until_a_reset() {
        let (mut t, p) = live_transport();
        p.lock().unwrap().state = Some(QueueState::NeedsReset);
        t.notified(1);
        p.lock().unwrap().state = None;
        assert_eq!(t.notified(1), QueueState::Drained);
        t.notified(0);
        assert_eq!(p.lock().unwrap().processed, vec![1, 0], "queue 1 stopped");
        wr(&mut t, 0x070, 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, 0x070, LIVE);
        t.notified(1);
        assert_eq!(
            p.lock().unwrap().processed,
            vec![1, 0, 1],
            "served after a reset"
        );
    }

    #[test]
    fn config_space_and_interrupts() {
        let (mut t, p) = transport();
        t.write(0x104, &[9, 8]);
        assert_eq!(p.lock().unwrap().config[4..6], [9, 8]);
        let mut d = [0u8; 2];
        t.read(0x104, &mut d);
        assert_eq!(d, [9, 8]);
        let g = rd(&mut t, 0x0fc);
        t.config_changed();
        assert_eq!(rd(&mut t, 0x0fc), g + 1);
        t.irq().signal(super::super::INT_USED_RING);
        assert_eq!(rd(&mut t, 0x060), 1);
        wr(&mut t, 0x064, 1);
        assert_eq!(rd(&mut t, 0x060), 0);
    }
}
