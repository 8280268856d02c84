//! `foliovm bench blk`: the block device's request path against raw file
//! I/O, in one run. The guest side is simulated (a driver that keeps the
//! queue full of `req`-byte requests), so the number is the device's cost
//! (chain checks, pins, status, used ring) over `pread`/`pwrite` of the same
//! sizes at the same offsets, not the guest kernel's.

use super::{Block, DiskImage, SECTOR_SIZE};
use crate::virtio::{ActiveQueues, IrqLine, NoRamControl, VirtioDevice};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 256;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDRS: u64 = 0x4000;
const STATUS: u64 = 0x8000;
const DATA: u64 = 0x10_0000;

/// One measurement: bytes moved and seconds.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Bytes.
    pub bytes: u64,
    /// Seconds.
    pub secs: f64,
}

impl Throughput {
    /// MiB/s.
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.secs
    }
}

/// Results of [`run`]: (device, raw) for reads and for writes.
#[derive(Debug, Clone, Copy)]
pub struct BlkBench {
    /// Reads through the device.
    pub dev_read: Throughput,
    /// Raw `pread`.
    pub raw_read: Throughput,
    /// Writes through the device.
    pub dev_write: Throughput,
    /// Raw `pwrite`.
    pub raw_write: Throughput,
}

/// Read and write `image` (its whole size, rounded down to `req`) with
/// `req`-byte requests, through the device and raw, `passes` times each
/// (the best pass counts).
///
/// # Errors
/// I/O errors, or an image that cannot be opened.
pub fn run(image: &Path, req: u32, passes: usize) -> Result<BlkBench, String> {
    let disk = DiskImage::open(image, false, "bench").map_err(|e| e.to_string())?;
    let size = disk.nsectors() * SECTOR_SIZE / u64::from(req) * u64::from(req);
    if size == 0 {
        return Err("image smaller than one request".into());
    }
    let depth = u64::from(QSIZE / 3);
    let mem = GuestMemoryMmap::from_ranges(&[(
        GuestAddress(0),
        (DATA + depth * u64::from(req)) as usize,
    )])
    .map_err(|e| e.to_string())?;
    let mut dev = Block::new(disk, Arc::new(NoRamControl), "bench");
    let mut q = Queue::new(QSIZE).map_err(|e| e.to_string())?;
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    dev.activate(ActiveQueues {
        queues: vec![q],
        mem: mem.clone(),
        irq: IrqLine::new(|| Ok(())),
        acked_features: 0,
    });
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| e.to_string())?;
    let mut avail_idx = 0u16;
    let best = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<Throughput, String> {
        let mut secs = f64::MAX;
        for _ in 0..passes.max(1) {
            let t = Instant::now();
            f()?;
            secs = secs.min(t.elapsed().as_secs_f64());
        }
        Ok(Throughput { bytes: size, secs })
    };
    let mut through_device = |write: bool| -> Result<(), String> {
        let moved = |c: super::BlockCounters| if write { c.write_bytes } else { c.read_bytes };
        let before = moved(dev.counters());
        let mut off = 0;
        while off < size {
            let n = depth.min((size - off) / u64::from(req));
            for i in 0..n {
                let d = (i * 3) as u16;
                let hdr = HDRS + i * 16;
                let mut h = [0u8; 16];
                h[0] = u8::from(write);
                h[8..16].copy_from_slice(&((off + i * u64::from(req)) / SECTOR_SIZE).to_le_bytes());
                mem.write_slice(&h, GuestAddress(hdr))
                    .map_err(|e| e.to_string())?;
                let data_flags = if write { 1 } else { 3 }; // NEXT | (WRITE for reads)
                let descs: [(u64, u32, u16, u16); 3] = [
                    (hdr, 16, 1, d + 1),
                    (DATA + i * u64::from(req), req, data_flags, d + 2),
                    (STATUS + i, 1, 2, 0),
                ];
                for (k, (addr, len, flags, next)) in descs.iter().enumerate() {
                    let at = DESC + (u64::from(d) + k as u64) * 16;
                    let mut raw = [0u8; 16];
                    raw[0..8].copy_from_slice(&addr.to_le_bytes());
                    raw[8..12].copy_from_slice(&len.to_le_bytes());
                    raw[12..14].copy_from_slice(&flags.to_le_bytes());
                    raw[14..16].copy_from_slice(&next.to_le_bytes());
                    mem.write_slice(&raw, GuestAddress(at))
                        .map_err(|e| e.to_string())?;
                }
                let slot = AVAIL + 4 + u64::from(avail_idx % QSIZE) * 2;
                mem.write_obj(d, GuestAddress(slot))
                    .map_err(|e| e.to_string())?;
                avail_idx = avail_idx.wrapping_add(1);
            }
            mem.write_obj(avail_idx, GuestAddress(AVAIL + 2))
                .map_err(|e| e.to_string())?;
            dev.process_queue(0);
            off += n * u64::from(req);
        }
        if dev.counters().errors != 0 {
            return Err(format!("device reported errors: {:?}", dev.counters()));
        }
        // A pass times only what the device really moved.
        let done = moved(dev.counters()) - before;
        if done != size {
            return Err(format!("device moved {done} of {size} bytes"));
        }
        Ok(())
    };
    let dev_read = best(&mut || through_device(false))?;
    let dev_write = best(&mut || through_device(true))?;
    let mut buf = vec![0u8; req as usize];
    let raw_read = best(&mut || {
        let mut off = 0;
        while off < size {
            file.read_exact_at(&mut buf, off)
                .map_err(|e| e.to_string())?;
            off += u64::from(req);
        }
        Ok(())
    })?;
    let raw_write = best(&mut || {
        let mut off = 0;
        while off < size {
            file.write_all_at(&buf, off).map_err(|e| e.to_string())?;
            off += u64::from(req);
        }
        Ok(())
    })?;
    Ok(BlkBench {
        dev_read,
        raw_read,
        dev_write,
        raw_write,
    })
}

impl std::fmt::Display for BlkBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<6} {:>12} {:>12} {:>7}",
            "op", "device MiB/s", "raw MiB/s", "ratio"
        )?;
        for (op, d, r) in [
            ("read", self.dev_read, self.raw_read),
            ("write", self.dev_write, self.raw_write),
        ] {
            writeln!(
                f,
                "{op:<6} {:>12.0} {:>12.0} {:>7.2}",
                d.mib_s(),
                r.mib_s(),
                d.mib_s() / r.mib_s()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_runs_and_moves_every_byte() {
        let p = std::env::temp_dir().join(format!("foliovm-blk-bench-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        // `run` fails unless the device's own counters moved the whole
        // image in each direction.
        let b = run(&p, 64 << 10, 1).unwrap();
        assert_eq!(b.dev_read.bytes, 1 << 20);
        assert!(b.to_string().contains("read"));
        let _ = std::fs::remove_file(&p);
    }
}
