//! Helpers shared by the memory-manager tests: host threads act as vCPUs
//! and touch guest RAM through its host mapping.

#![allow(dead_code)]

use mem::{
    FaultDelivery, FolioBackend, GuestAddress, GuestMemoryBackend, MemoryManager, MmConfig,
    RamRegion, ReclaimConfig, RelocateSwitch, SwapConfig, SwapTarget, VmId, VmLimits, PAGE_SIZE,
};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub const MIB: u64 = 1 << 20;

/// A manager with `budget` bytes and `threads` handler threads.
pub fn manager(budget: u64, threads: usize) -> Arc<MemoryManager> {
    MemoryManager::new(config(budget, threads)).expect("memory manager")
}

/// The config of [`manager`]: no swap file, default reclaim settings.
pub fn config(budget: u64, threads: usize) -> MmConfig {
    MmConfig {
        budget_bytes: budget,
        handler_threads: threads,
        fault_delivery: FaultDelivery::Handlers,
        prezero_limit_bytes: None,
        swap: None,
        reclaim: ReclaimConfig::default(),
    }
}

/// A thread that calls `f(0)`, `f(1)`, ... until `stop` is set, and
/// returns how many calls it made.
pub fn spawn_until(
    stop: &Arc<std::sync::atomic::AtomicBool>,
    f: Box<dyn Fn(u64) + Send>,
) -> std::thread::JoinHandle<u64> {
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            f(n);
            n += 1;
        }
        n
    })
}

/// Let `threads` and `chaos` run for `limit` (less if a thread ends
/// early: it failed), then set `stop`, join them all, and re-raise a
/// thread's panic; returns what `chaos` returned.
pub fn run_for<R, T>(
    limit: Duration,
    stop: &std::sync::atomic::AtomicBool,
    threads: Vec<std::thread::JoinHandle<R>>,
    chaos: std::thread::JoinHandle<T>,
) -> T {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit && !threads.iter().any(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut panics = Vec::new();
    for t in threads {
        if let Err(e) = t.join() {
            panics.push(e);
        }
    }
    let out = chaos.join().unwrap();
    if let Some(e) = panics.pop() {
        std::panic::resume_unwind(e);
    }
    out
}

/// Wait up to `limit` for `cond`; whether it came true.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while !cond() {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A manager with `budget` bytes, `threads` handler threads and a swap
/// file of `swap` bytes in the system temp directory.
pub fn swap_manager(
    budget: u64,
    threads: usize,
    swap: u64,
    background: bool,
) -> Arc<MemoryManager> {
    swap_manager_with(budget, threads, swap, background, FaultDelivery::Handlers)
}

/// [`swap_manager`] with its faults delivered as `delivery` says.
pub fn swap_manager_with(
    budget: u64,
    threads: usize,
    swap: u64,
    background: bool,
    delivery: FaultDelivery,
) -> Arc<MemoryManager> {
    MemoryManager::new(MmConfig {
        budget_bytes: budget,
        handler_threads: threads,
        fault_delivery: delivery,
        prezero_limit_bytes: None,
        swap: Some(SwapConfig {
            target: SwapTarget::Dir(std::env::temp_dir()),
            size_bytes: swap,
        }),
        reclaim: ReclaimConfig {
            background,
            ..ReclaimConfig::default()
        },
    })
    .expect("memory manager with swap")
}

/// The value the tests write at word `w` of page `p` in generation `g`.
pub fn pattern(p: u64, w: u64, g: u64) -> u64 {
    (p << 32) ^ (w << 20) ^ g.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555
}

/// A tiny deterministic PRNG (xorshift), so failures reproduce by seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Guest RAM accessor over one region, as a vCPU sees it.
#[derive(Clone, Copy)]
pub struct Ram(pub RamRegion);

impl Ram {
    pub fn of(b: &dyn GuestMemoryBackend) -> Ram {
        Ram(b.regions()[0])
    }
    fn ptr(&self, off: u64) -> *mut u64 {
        assert!(off + 8 <= self.0.size && off.is_multiple_of(8));
        self.0.host_addr.add(off).as_ptr().cast()
    }
    pub fn read(&self, off: u64) -> u64 {
        // SAFETY: `off` is inside the live region mapping (asserted); guest
        // memory is shared with other threads, so access it volatile.
        unsafe { std::ptr::read_volatile(self.ptr(off)) }
    }
    pub fn write(&self, off: u64, v: u64) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.ptr(off), v) }
    }
    pub fn gpa(&self, off: u64) -> GuestAddress {
        GuestAddress(self.0.guest_base.raw() + off)
    }
}

/// A VM with one RAM region at guest address 0, as most tests use.
pub struct TestVm {
    pub id: VmId,
    pub backend: Arc<FolioBackend>,
    pub ram: Ram,
    pub pages: u64,
}

impl TestVm {
    /// VM `name` with `bytes` of RAM.
    pub fn new(mm: &Arc<MemoryManager>, name: &str, bytes: u64) -> TestVm {
        Self::with_limits(mm, name, bytes, VmLimits::default())
    }

    /// [`TestVm::new`] with `limits` set before its RAM exists.
    pub fn with_limits(
        mm: &Arc<MemoryManager>,
        name: &str,
        bytes: u64,
        limits: VmLimits,
    ) -> TestVm {
        let id = mm.create_vm(name).expect("create_vm");
        mm.set_vm_limits(id, limits).expect("set_vm_limits");
        let backend = mm
            .backend(id, &[(GuestAddress(0), bytes)])
            .expect("backend");
        let ram = Ram::of(&*backend);
        TestVm {
            id,
            backend,
            ram,
            pages: bytes / PAGE_SIZE,
        }
    }

    /// Write generation `g` into the first word of every page.
    pub fn fill(&self, g: u64) {
        for p in 0..self.pages {
            self.ram.write(p * PAGE_SIZE, pattern(p, 0, g));
        }
    }

    /// Check that the first word of every page holds generation `g`.
    pub fn verify(&self, g: u64) {
        for p in 0..self.pages {
            assert_eq!(self.ram.read(p * PAGE_SIZE), pattern(p, 0, g), "page {p}");
        }
    }

    /// Drop the backend and the VM, then check that the manager settles
    /// and its allocator balances.
    pub fn destroy(self, mm: &MemoryManager) {
        drop(self.backend);
        mm.destroy_vm(self.id).expect("destroy_vm");
        settle_and_check(mm);
    }
}

/// AnonHugePages (kB) of the mapping containing `addr`, from /proc/self/smaps.
pub fn anon_huge_kb(addr: usize) -> u64 {
    mem::smaps::anon_huge_bytes(addr).expect("smaps") / 1024
}

/// Wait for the worker to settle, then check that the allocator balances.
pub fn settle_and_check(mm: &MemoryManager) {
    assert!(
        mm.wait_idle(Duration::from_secs(30)),
        "worker did not settle"
    );
    mm.check_accounting()
        .expect("allocator accounting balances");
}

/// Read one word of our own memory through `process_vm_readv`, which
/// faults like a device access (GUP): a poisoned page is `EFAULT` here
/// rather than `SIGBUS` in the test.
pub fn read_via_gup(addr: usize) -> std::io::Result<u64> {
    let mut word = 0u64;
    let local = libc::iovec {
        iov_base: (&mut word as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` is our own 8-byte buffer, alive across the call; the
    // kernel reads `remote` through our page tables and fails cleanly on a
    // bad page.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    match n {
        8 => Ok(word),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// No entry was ever found present without its host page: the state a
/// short-counted `UFFDIO_MOVE` left behind (see `RawUffd::move_pages`),
/// which the fault path repairs and counts.
pub fn assert_no_unbacked(s: &mem::MmStats) {
    let f = &s.faults;
    assert_eq!(
        (
            f.unbacked_restored,
            f.unbacked_poisoned,
            f.unbacked_from_slot
        ),
        (0, 0, 0),
        "entries present without their host page"
    );
}

/// The guest's view of its RAM: regions by guest address, as the VMM's
/// memslots; a relocation's switch callback ([`View::switch`]) replaces
/// them while the "vCPUs" are held off (the write lock is the pause).
pub struct View(pub RwLock<Vec<RamRegion>>);

impl View {
    pub fn new(r: &[RamRegion]) -> View {
        View(RwLock::new(r.to_vec()))
    }
    fn ram_at(v: &[RamRegion], gpa: u64) -> (Ram, u64) {
        let r = v
            .iter()
            .find(|r| gpa >= r.guest_base.raw() && gpa < r.guest_base.raw() + r.size)
            .expect("gpa in a region");
        (Ram(*r), gpa - r.guest_base.raw())
    }
    /// The accessor of the region holding `gpa` as the view has it now,
    /// and `gpa`'s offset in it (for a thread that must not hold the view).
    pub fn ram_now(&self, gpa: u64) -> (Ram, u64) {
        View::ram_at(&self.0.read().unwrap(), gpa)
    }
    pub fn read(&self, gpa: u64) -> u64 {
        let v = self.0.read().unwrap();
        let (ram, off) = View::ram_at(&v, gpa);
        ram.read(off)
    }
    pub fn write(&self, gpa: u64, val: u64) {
        let v = self.0.read().unwrap();
        let (ram, off) = View::ram_at(&v, gpa);
        ram.write(off, val)
    }
    /// The switch callback: hold the vCPUs off, swap the regions.
    pub fn switch(&self, sw: &RelocateSwitch) -> Result<(), String> {
        let mut v = self.0.write().unwrap();
        v.retain(|r| !sw.old.contains(r));
        v.extend(sw.new.iter().copied());
        v.sort_by_key(|r| r.guest_base);
        Ok(())
    }
}

/// A chaos thread's body (for [`spawn_until`]): each pass discards the
/// next 16-page chunk of `vm` (chunk `n * 37` mod their count) under the
/// chunk's write lock, zeroes what `expected` holds for its words
/// (`slots` per page), then sleeps `pause`.
pub fn chunk_discarder(
    mm: &Arc<MemoryManager>,
    vm: VmId,
    expected: &Arc<Vec<std::sync::atomic::AtomicU64>>,
    chunks: &Arc<Vec<RwLock<()>>>,
    slots: u64,
    pause: Duration,
) -> Box<dyn Fn(u64) + Send> {
    let (mm, expected, chunks) = (mm.clone(), expected.clone(), chunks.clone());
    Box::new(move |n| {
        let c = (n * 37) % chunks.len() as u64;
        let _g = chunks[c as usize].write().unwrap();
        mm.discard(vm, GuestAddress(c * 16 * PAGE_SIZE), 16 * PAGE_SIZE)
            .unwrap();
        for p in c * 16..(c + 1) * 16 {
            for t in 0..slots {
                expected[(p * slots + t) as usize].store(0, std::sync::atomic::Ordering::SeqCst);
            }
        }
        std::thread::sleep(pause);
    })
}
