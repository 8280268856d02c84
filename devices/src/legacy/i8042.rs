//! The i8042 keyboard controller with an AT keyboard behind it, for the
//! two things a microVM needs from it: the guest's `reboot` (with
//! `reboot=k`) writes 0xfe to port 0x64, which ends the VM; and the VMM's
//! Ctrl+Alt+Del ([`I8042::send_ctrl_alt_del`], Firecracker's
//! `SendCtrlAltDel`), which queues the keys' scancodes and raises IRQ 1.
//!
//! vm-superio's `I8042Device` does the reset only (every read is 0, so a
//! guest driver finds no controller), hence this one. It emulates what
//! Linux's `i8042` and `atkbd` drivers use: the controller's command byte
//! and self-tests, an output buffer, no AUX (mouse) port, and a keyboard
//! that answers its commands (ACK, the MF2 id) and sends scancode set 2
//! (untranslated: the command byte's XLATE bit starts clear).
//!
//! ```text
//!  port 0x64 write: controller command --(0x60/0xd1/0xd3...)--> next 0x60 write is its parameter
//!  port 0x60 write: parameter, else a keyboard command (ACK'd; some take a parameter too)
//!  port 0x60 read:  next byte of the output buffer (IRQ 1 again while more are queued)
//!  port 0x64 read:  status (OBF while the buffer holds bytes)
//! ```

use crate::BusDevice;
use std::collections::VecDeque;
use vm_superio::Trigger;

/// Offset of the data port (0x60) from the device base.
const DATA: u64 = 0;
/// Offset of the status/command port (0x64).
const STATUS: u64 = 4;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_CTL_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Status register bits.
const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
const STR_CMDDAT: u8 = 0x08;
const STR_KEYLOCK: u8 = 0x10;

// Command byte ("CTR") bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;

// Keyboard commands and answers.
const KBD_SETLEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANSET: u8 = 0xf0;
const KBD_GETID: u8 = 0xf2;
const KBD_SETREP: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_RESET_DIS: u8 = 0xf5;
const KBD_RESET_DEF: u8 = 0xf6;
const KBD_EX_ENABLE: u8 = 0xea;
const KBD_RESET_BAT: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
/// An MF2 keyboard's id.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// "Clock line stuck low": the answer of a controller without an AUX port.
const AUX_TEST_NO_DEVICE: u8 = 0x01;
const CTL_TEST_OK: u8 = 0x55;

/// Scancode set 2 make codes of Left Ctrl, Left Alt and Delete.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Bytes the output buffer holds (Linux's `I8042_BUFFER_SIZE`).
const BUF_SIZE: usize = 16;

/// What the next write to the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataWrite {
    /// A keyboard command.
    KbdCommand,
    /// The parameter of keyboard command `.0`.
    KbdParam(u8),
    /// The parameter of controller command `.0`.
    CtlParam(u8),
}

/// Errors from [`I8042::send_ctrl_alt_del`].
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The guest has not enabled the keyboard: no keyboard driver (Linux:
    /// `CONFIG_KEYBOARD_ATKBD`), or it has not probed yet.
    #[error("the guest has not enabled its keyboard (no i8042 keyboard driver, or still booting)")]
    KeyboardDisabled,
    /// The guest has not read the keys sent before.
    #[error("the keyboard buffer is full: the guest is not reading its keyboard")]
    BufferFull,
    /// IRQ 1 could not be raised.
    #[error("cannot raise the keyboard interrupt")]
    Irq(#[source] std::io::Error),
}

/// i8042 at ports 0x60-0x64 (placed at 0x60 with length 5).
pub struct I8042<T: Trigger<E = std::io::Error>> {
    reset: T,
    kbd_irq: T,
    /// The command byte.
    ctr: u8,
    /// The output port (only stored).
    outp: u8,
    /// Whether the last write went to the command port.
    cmd_last: bool,
    next_data: DataWrite,
    /// The keyboard scans keys (`KBD_ENABLE`) or not (`KBD_RESET_DIS`).
    scanning: bool,
    out: VecDeque<u8>,
}

impl<T: Trigger<E = std::io::Error>> I8042<T> {
    /// A controller that signals `reset` when the guest asks for a CPU
    /// reset and `kbd_irq` (IRQ 1) when keyboard bytes are queued. It
    /// starts as firmware would leave it: keyboard interface disabled
    /// until the guest's driver enables it.
    pub fn new(reset: T, kbd_irq: T) -> Self {
        I8042 {
            reset,
            kbd_irq,
            ctr: CTR_SYS | CTR_KBDDIS | CTR_AUXDIS,
            outp: 0,
            cmd_last: false,
            next_data: DataWrite::KbdCommand,
            scanning: true,
            out: VecDeque::with_capacity(BUF_SIZE),
        }
    }

    /// Queue the make codes of Ctrl, Alt and Delete and raise IRQ 1, as a
    /// user pressing them would. Nothing is queued on error.
    ///
    /// # Errors
    /// [`I8042Error`].
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.ctr & (CTR_KBDINT | CTR_KBDDIS) != CTR_KBDINT || !self.scanning {
            return Err(I8042Error::KeyboardDisabled);
        }
        if BUF_SIZE - self.out.len() < CTRL_ALT_DEL.len() {
            return Err(I8042Error::BufferFull);
        }
        self.out.extend(CTRL_ALT_DEL);
        self.kbd_irq.trigger().map_err(I8042Error::Irq)
    }

    fn status(&self) -> u8 {
        let mut s = STR_SYS | STR_KEYLOCK;
        if !self.out.is_empty() {
            s |= STR_OBF;
        }
        if self.cmd_last {
            s |= STR_CMDDAT;
        }
        s
    }

    /// A controller answer: replaces whatever was queued, no interrupt
    /// (the driver polls for it).
    fn answer(&mut self, b: u8) {
        self.out.clear();
        self.out.push_back(b);
    }

    /// Keyboard bytes: replace what was queued and raise IRQ 1 if the
    /// guest enabled it.
    fn kbd_answer(&mut self, bytes: &[u8]) {
        self.out.clear();
        self.out.extend(bytes);
        self.kbd_interrupt();
    }

    fn kbd_interrupt(&self) {
        if self.ctr & CTR_KBDINT != 0 {
            // Fails only if the VMM is tearing down.
            let _ = self.kbd_irq.trigger();
        }
    }

    fn command(&mut self, cmd: u8) {
        self.next_data = DataWrite::KbdCommand;
        match cmd {
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_READ_OUTP => self.answer(self.outp),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_KBD_LOOP | CMD_AUX_LOOP | CMD_AUX_SEND => {
                self.next_data = DataWrite::CtlParam(cmd);
            }
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST => self.answer(AUX_TEST_NO_DEVICE),
            CMD_CTL_TEST => self.answer(CTL_TEST_OK),
            CMD_KBD_TEST => self.answer(0),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_RESET_CPU => {
                // Fails only if the VMM is tearing down.
                let _ = self.reset.trigger();
            }
            _ => {}
        }
    }

    fn data(&mut self, v: u8) {
        let what = std::mem::replace(&mut self.next_data, DataWrite::KbdCommand);
        match what {
            DataWrite::CtlParam(CMD_WRITE_CTR) => self.ctr = v,
            DataWrite::CtlParam(CMD_WRITE_OUTP) => self.outp = v,
            DataWrite::CtlParam(CMD_KBD_LOOP) => self.kbd_answer(&[v]),
            // No AUX port: the looped byte comes back without the AUX
            // status bit (Linux then reports the loop test failed at once
            // instead of timing out), and bytes sent to it go nowhere.
            DataWrite::CtlParam(CMD_AUX_LOOP) => self.answer(v),
            DataWrite::CtlParam(_) => {}
            DataWrite::KbdParam(KBD_SCANSET) if v == 0 => self.kbd_answer(&[KBD_ACK, 2]),
            DataWrite::KbdParam(_) => self.kbd_answer(&[KBD_ACK]),
            DataWrite::KbdCommand => self.kbd_command(v),
        }
    }

    fn kbd_command(&mut self, cmd: u8) {
        match cmd {
            KBD_SETLEDS | KBD_SCANSET | KBD_SETREP | KBD_EX_ENABLE => {
                self.next_data = DataWrite::KbdParam(cmd);
                self.kbd_answer(&[KBD_ACK]);
            }
            KBD_GETID => self.kbd_answer(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_ECHO => self.kbd_answer(&[KBD_ECHO]),
            KBD_RESET_BAT => {
                self.scanning = true;
                self.kbd_answer(&[KBD_ACK, KBD_BAT_OK]);
            }
            KBD_ENABLE | KBD_RESET_DEF => {
                self.scanning = true;
                self.kbd_answer(&[KBD_ACK]);
            }
            KBD_RESET_DIS => {
                self.scanning = false;
                self.kbd_answer(&[KBD_ACK]);
            }
            _ => self.kbd_answer(&[KBD_ACK]),
        }
    }
}

impl<T: Trigger<E = std::io::Error> + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((b, rest)) = data.split_first_mut() else {
            return;
        };
        rest.fill(0);
        *b = match offset {
            STATUS => self.status(),
            DATA => {
                let v = self.out.pop_front().unwrap_or(0);
                // One byte per interrupt: tell the guest about the next.
                if !self.out.is_empty() {
                    self.kbd_interrupt();
                }
                v
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            STATUS => {
                self.cmd_last = true;
                self.command(v);
            }
            DATA => {
                self.cmd_last = false;
                self.data(v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Counts its triggers.
    #[derive(Clone, Default)]
    struct Count(Arc<AtomicU32>);

    impl Count {
        fn take(&self) -> u32 {
            self.0.swap(0, Ordering::SeqCst)
        }
    }

    impl Trigger for Count {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn dev() -> (I8042<Count>, Count, Count) {
        let (reset, irq) = (Count::default(), Count::default());
        (I8042::new(reset.clone(), irq.clone()), reset, irq)
    }

    fn inb(k: &mut I8042<Count>, port: u64) -> u8 {
        let mut b = [0u8];
        k.read(port, &mut b);
        b[0]
    }

    /// Linux's `i8042_command()`: command, parameters, then poll OBF for
    /// the answers.
    fn command(k: &mut I8042<Count>, cmd: u8, params: &[u8], answers: usize) -> Vec<u8> {
        k.write(STATUS, &[cmd]);
        for p in params {
            k.write(DATA, &[*p]);
        }
        (0..answers)
            .map(|_| {
                assert_ne!(inb(k, STATUS) & STR_OBF, 0, "no answer to {cmd:#x}");
                inb(k, DATA)
            })
            .collect()
    }

    /// What Linux's i8042 and atkbd drivers do at boot, in short.
    fn linux_probe(k: &mut I8042<Count>, irq: &Count) {
        let ctr = command(k, CMD_READ_CTR, &[], 1)[0];
        assert_eq!(ctr & 0x40, 0, "untranslated: XLATE clear");
        command(k, CMD_WRITE_CTR, &[(ctr | CTR_KBDDIS) & !CTR_KBDINT], 0);
        // No AUX port: the loop answers without the AUX bit, the test fails.
        assert_eq!(command(k, CMD_AUX_LOOP, &[0x5a], 1), [0x5a]);
        assert_eq!(command(k, CMD_AUX_TEST, &[], 1), [AUX_TEST_NO_DEVICE]);
        // Enable the keyboard port and its interrupt.
        command(k, CMD_WRITE_CTR, &[(ctr & !CTR_KBDDIS) | CTR_KBDINT], 0);
        assert_eq!(command(k, CMD_READ_CTR, &[], 1)[0] & CTR_KBDINT, CTR_KBDINT);
        irq.take();
        // atkbd: GETID answers ACK and the MF2 id, one byte per interrupt.
        k.write(DATA, &[KBD_GETID]);
        let mut got = Vec::new();
        while inb(k, STATUS) & STR_OBF != 0 {
            got.push(inb(k, DATA));
        }
        assert_eq!(got, [KBD_ACK, 0xab, 0x83]);
        assert_eq!(irq.take(), 3, "one interrupt per byte");
        // Deactivate, set LEDs (a parameter, ACK'd too), activate.
        for b in [KBD_RESET_DIS, KBD_SETLEDS, 0, KBD_ENABLE] {
            k.write(DATA, &[b]);
            assert_eq!(inb(k, DATA), KBD_ACK, "after {b:#x}");
        }
        irq.take();
    }

    #[test]
    fn reset_command_signals() {
        let (mut k, reset, _) = dev();
        k.write(STATUS, &[CMD_RESET_CPU]);
        assert_eq!(reset.take(), 1);
    }

    #[test]
    fn ctrl_alt_del_queues_set2_scancodes_and_raises_irq1() {
        let (mut k, reset, irq) = dev();
        linux_probe(&mut k, &irq);
        k.send_ctrl_alt_del().unwrap();
        assert_eq!(irq.take(), 1);
        let mut got = Vec::new();
        while inb(&mut k, STATUS) & STR_OBF != 0 {
            got.push(inb(&mut k, DATA));
        }
        assert_eq!(got, [0x14, 0x11, 0xe0, 0x71]);
        // The first byte came with the send, each further one with a read.
        assert_eq!(irq.take(), 3);
        assert_eq!(inb(&mut k, DATA), 0, "an empty buffer reads 0");
        assert_eq!(reset.take(), 0);
    }

    #[test]
    fn ctrl_alt_del_is_refused_until_the_guest_enables_the_keyboard() {
        let (mut k, _, irq) = dev();
        assert!(matches!(
            k.send_ctrl_alt_del(),
            Err(I8042Error::KeyboardDisabled)
        ));
        assert_eq!(inb(&mut k, STATUS) & STR_OBF, 0, "nothing queued");
        linux_probe(&mut k, &irq);
        // atkbd deactivated the keyboard (a driver going away does too).
        k.write(DATA, &[KBD_RESET_DIS]);
        inb(&mut k, DATA);
        assert!(matches!(
            k.send_ctrl_alt_del(),
            Err(I8042Error::KeyboardDisabled)
        ));
        k.write(DATA, &[KBD_ENABLE]);
        inb(&mut k, DATA);
        irq.take();
        // Four sends fill the 16-byte buffer of a guest that never reads.
        for _ in 0..4 {
            k.send_ctrl_alt_del().unwrap();
        }
        assert!(matches!(k.send_ctrl_alt_del(), Err(I8042Error::BufferFull)));
        assert_eq!(irq.take(), 4);
    }

    #[test]
    fn controller_commands() {
        let (mut k, _, irq) = dev();
        assert_eq!(command(&mut k, CMD_CTL_TEST, &[], 1), [CTL_TEST_OK]);
        assert_eq!(command(&mut k, CMD_KBD_TEST, &[], 1), [0]);
        command(&mut k, CMD_WRITE_OUTP, &[0x5b], 0);
        assert_eq!(command(&mut k, CMD_READ_OUTP, &[], 1), [0x5b]);
        command(&mut k, CMD_KBD_ENABLE, &[], 0);
        command(&mut k, CMD_AUX_ENABLE, &[], 0);
        assert_eq!(command(&mut k, CMD_READ_CTR, &[], 1), [CTR_SYS]);
        assert_ne!(inb(&mut k, STATUS) & STR_CMDDAT, 0);
        // Controller answers raise no interrupt; the driver polls them.
        assert_eq!(irq.take(), 0);
        // Bytes sent to the absent AUX port vanish.
        command(&mut k, CMD_AUX_SEND, &[0xf4], 0);
        assert_eq!(inb(&mut k, STATUS) & STR_OBF, 0);
        // Wide and stray accesses do not panic.
        let mut wide = [0xaau8; 4];
        k.read(STATUS, &mut wide);
        assert_eq!(&wide[1..], [0, 0, 0]);
        k.write(2, &[0xfe]);
        k.write(STATUS, &[]);
    }
}
