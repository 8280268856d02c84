//! Descriptor chains, checked: what a device may trust about a chain the
//! guest placed in a queue.
//!
//! virtio-queue's [`DescriptorChain`] iterator stops quietly on a bad next
//! index, an unreadable descriptor or a loop (its TTL runs out). That is
//! safe but hides the error, so [`parse_chain`] walks the chain itself
//! through the iterator and turns every way a chain can be malformed into a
//! [`ChainError`]: a head index past the queue ([`pop_chain`]), a truncated
//! chain (the last descriptor still says NEXT), a buffer outside guest RAM,
//! an empty chain. Devices then check the direction and size rules of their
//! own request format.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The most descriptors a chain may have (the largest queue we offer).
pub const MAX_CHAIN_LEN: usize = 1024;

/// One buffer of a checked chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (the driver reads it back).
    pub writable: bool,
}

/// A chain whose buffers all lie in guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// The buffers in order.
    pub buffers: Vec<Buffer>,
}

/// How a guest's descriptor chain can be malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The head descriptor could not be read (bad index or table address).
    #[error("descriptor chain {head} is empty or its table is unreadable")]
    Empty {
        /// Head index.
        head: u16,
    },
    /// The chain ended on a descriptor that still has NEXT set: a loop, a
    /// next index past the queue, or an unreadable descriptor.
    #[error(
        "descriptor chain {head} is truncated after {len} descriptors (loop or bad next index)"
    )]
    Truncated {
        /// Head index.
        head: u16,
        /// Descriptors read.
        len: usize,
    },
    /// The avail ring names a head index past the queue: nothing of the
    /// chain can be read, and it cannot go to the used ring either.
    #[error("descriptor chain head {head} is past the queue size {size}")]
    HeadOutOfRange {
        /// Head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A buffer lies (partly) outside guest RAM.
    #[error("descriptor chain {head}: buffer {addr:#x}+{len:#x} is outside guest RAM")]
    OutOfRange {
        /// Head index.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one.
    #[error("descriptor chain {head}: a readable buffer follows a writable one")]
    ReadAfterWrite {
        /// Head index.
        head: u16,
    },
}

/// Walk and check `chain`.
///
/// # Errors
/// [`ChainError`] naming what is wrong; the caller still owns `head` and
/// must return it to the used ring.
pub fn parse_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Chain, ChainError> {
    let head = chain.head_index();
    let mut buffers = Vec::new();
    let mut last: Option<Descriptor> = None;
    let mut seen_writable = false;
    for d in chain {
        if buffers.len() == MAX_CHAIN_LEN {
            return Err(ChainError::Truncated {
                head,
                len: buffers.len(),
            });
        }
        let b = Buffer {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        };
        if !mem.check_range(b.addr, b.len as usize) {
            return Err(ChainError::OutOfRange {
                head,
                addr: b.addr.0,
                len: b.len,
            });
        }
        if !b.writable && seen_writable {
            return Err(ChainError::ReadAfterWrite { head });
        }
        seen_writable |= b.writable;
        buffers.push(b);
        last = Some(d);
    }
    match last {
        None => Err(ChainError::Empty { head }),
        Some(d) if d.has_next() => Err(ChainError::Truncated {
            head,
            len: buffers.len(),
        }),
        Some(_) => Ok(Chain { head, buffers }),
    }
}

/// Pop the next available chain of `queue`: `Some(Ok)` for a checked
/// chain, `Some(Err((head, e)))` for a malformed one, `None` when the ring
/// is empty or unusable.
pub fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Option<Result<Chain, (u16, ChainError)>> {
    let chain = queue.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let size = queue.size();
    if head >= size {
        return Some(Err((head, ChainError::HeadOutOfRange { head, size })));
    }
    Some(parse_chain(chain, mem).map_err(|e| (head, e)))
}

/// The most chains one drain serves (the largest queue we offer). A
/// driver can make chains available as fast as the device serves them
/// (from another vCPU), so a drain without a limit could hold the event
/// loop, which every device of the VM shares, for ever.
pub const DRAIN_BUDGET: usize = 256;

/// The longest one drain goes on serving chains: once it has served at
/// least one and this much time went by, it stops as after
/// [`DRAIN_BUDGET`] chains. A chain count alone does not bound the time:
/// a block request can move hundreds of MiB, a flush can wait for the
/// disk, and 256 of them would hold the event loop for seconds or
/// minutes, while every other device of the VM waits (each VM's devices
/// share one event loop, its device I/O thread).
pub const DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(10);

/// What a device did with one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Done: put `head` on the used ring, `len` bytes written to the driver.
    Used(u16, u32),
    /// The device keeps the chain and answers it later itself.
    Kept,
    /// The device cannot serve the chain now (guest memory is short): it
    /// goes back to the queue, and the drain stops there, so that chains
    /// are still served in order once it is tried again.
    Deferred,
}

/// What a drain of a queue left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// The driver must be interrupted.
    pub notify: bool,
    /// A chain was deferred ([`Served::Deferred`]): drain again later,
    /// without waiting for a notification.
    pub deferred: bool,
    /// The drain stopped after [`DRAIN_BUDGET`] chains or [`DRAIN_TIME`]
    /// with more available: drain again once other work has had its turn.
    pub more: bool,
    /// The driver's avail index, when it is more than the queue size
    /// ahead of the device's: a driver error that stops the queue until a
    /// reset (nothing more is popped). The device should log it.
    pub bad_avail_idx: Option<u16>,
}

/// Run `f` on every available chain of `queue`, put each on the used ring
/// as `f` says ([`Served`]), and re-enable notifications (with event
/// index) until the ring stays empty, or stop after [`DRAIN_BUDGET`]
/// chains or [`DRAIN_TIME`] ([`Drained::more`]).
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    f: impl FnMut(Result<Chain, (u16, ChainError)>) -> Served,
) -> Drained {
    drain_queue_observed(queue, mem, f, || {})
}

/// [`drain_queue`], with `before_enable` run after each round's pops and
/// before notifications are enabled again: where a driver's new chain can
/// race the device (tests put one there).
fn drain_queue_observed(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut f: impl FnMut(Result<Chain, (u16, ChainError)>) -> Served,
    mut before_enable: impl FnMut(),
) -> Drained {
    if !queue.ready() {
        // The driver did not set this queue ready, so its ring addresses
        // were never checked or given: nothing of it is touched, not even
        // its notification flags.
        return Drained::default();
    }
    let mut used_any = false;
    let mut empty_rounds = 0;
    let mut served = 0;
    let mut bad_avail_idx = None;
    let start = std::time::Instant::now();
    let notify = |queue: &mut Queue, used_any: bool| {
        used_any && queue.needs_notification(mem).unwrap_or(true)
    };
    loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let mut popped = false;
        loop {
            if served == DRAIN_BUDGET || (served > 0 && start.elapsed() >= DRAIN_TIME) {
                // Notifications stay off: the caller drains again soon.
                return Drained {
                    notify: notify(queue, used_any),
                    deferred: false,
                    more: true,
                    bad_avail_idx: None,
                };
            }
            let Some(c) = pop_chain(queue, mem) else {
                break;
            };
            popped = true;
            served += 1;
            let (head, len) = match f(c) {
                Served::Used(head, len) => (head, len),
                Served::Kept => continue,
                Served::Deferred => {
                    // Unpopped: the retry pops the same chain first.
                    // Notifications stay off meanwhile; the retry's drain
                    // turns them on again.
                    queue.go_to_previous_position();
                    return Drained {
                        notify: notify(queue, used_any),
                        deferred: true,
                        more: false,
                        bad_avail_idx: None,
                    };
                }
            };
            if head >= queue.size() {
                // A head index past the queue (the device has logged the
                // chain as malformed): no used element can name it, so it
                // is dropped, and the chains after it are still served.
                continue;
            }
            if queue.add_used(mem, head, len).is_err() {
                // Only a corrupt used ring address gets here; the queue
                // was checked at activation, so stop rather than spin.
                return Drained {
                    notify: used_any,
                    deferred: false,
                    more: false,
                    bad_avail_idx: None,
                };
            }
            used_any = true;
        }
        // More work since we last looked: go round again. A round that
        // popped nothing gets one more: the driver may have added a chain
        // just after it looked, while notifications were off (it then does
        // not kick). A second empty round means a bogus avail index: stop,
        // or a hostile driver would keep this thread spinning.
        if !popped {
            empty_rounds += 1;
            let ahead = queue
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map(|idx| (idx.0, idx.0.wrapping_sub(queue.next_avail())));
            if let Ok((idx, ahead)) = ahead {
                if ahead > queue.size() {
                    bad_avail_idx = Some(idx);
                }
            }
        }
        before_enable();
        match queue.enable_notification(mem) {
            Ok(true) if empty_rounds < 2 => continue,
            _ => break,
        }
    }
    Drained {
        notify: notify(queue, used_any),
        deferred: false,
        more: false,
        bad_avail_idx,
    }
}

/// Test helpers: a guest memory and a queue in it, with raw descriptors.
#[cfg(test)]
pub(crate) mod testing {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// 1 MiB of guest memory at 0; queues live in the first 64 KiB.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A raw descriptor; `next` is used as given (the chain is not rewritten).
    pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    /// Put `descs` at the start of the table of a fresh 16-entry queue at
    /// `base`, make descriptor 0 available, and return the queue.
    pub fn queue_with(mem: &GuestMemoryMmap, base: u64, descs: &[RawDescriptor]) -> Queue {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), 16);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        vq.create_queue::<Queue>().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::Bytes;

    const N: u32 = VRING_DESC_F_NEXT;
    const W: u32 = VRING_DESC_F_WRITE;

    fn parse(descs: &[virtio_queue::desc::RawDescriptor]) -> Result<Chain, ChainError> {
        let mem = memory();
        let mut q = queue_with(&mem, 0, descs);
        match pop_chain(&mut q, &mem).expect("one chain available") {
            Ok(c) => Ok(c),
            Err((head, e)) => {
                assert_eq!(head, 0);
                Err(e)
            }
        }
    }

    #[test]
    fn a_good_chain_is_returned_in_order() {
        let c = parse(&[
            desc(0x10000, 16, N, 1),
            desc(0x11000, 512, N | W, 2),
            desc(0x12000, 1, W, 0),
        ])
        .unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.buffers.len(), 3);
        assert!(!c.buffers[0].writable && c.buffers[1].writable);
        assert_eq!((c.buffers[1].addr.0, c.buffers[1].len), (0x11000, 512));
    }

    #[test]
    fn out_of_range_buffers_are_refused() {
        // Past the end of RAM, straddling it, and wrapping the address space.
        for (addr, len) in [(2 << 20, 16), ((1 << 20) - 8, 16), (u64::MAX - 4, 16)] {
            let e = parse(&[desc(addr, len, 0, 0)]).unwrap_err();
            assert!(matches!(e, ChainError::OutOfRange { .. }), "{e}");
        }
    }

    #[test]
    fn loops_and_bad_next_indexes_are_truncated_chains() {
        // 0 -> 1 -> 0 -> ...: the TTL stops the walk; we report it.
        let e = parse(&[desc(0x10000, 16, N, 1), desc(0x11000, 16, N, 0)]).unwrap_err();
        assert!(matches!(e, ChainError::Truncated { .. }), "{e}");
        // A self loop.
        let e = parse(&[desc(0x10000, 16, N, 0)]).unwrap_err();
        assert!(matches!(e, ChainError::Truncated { .. }), "{e}");
        // A next index past the queue size.
        let e = parse(&[desc(0x10000, 16, N, 999)]).unwrap_err();
        assert!(matches!(e, ChainError::Truncated { len: 1, .. }), "{e}");
    }

    #[test]
    fn wrong_direction_order_is_refused() {
        let e = parse(&[desc(0x10000, 16, N | W, 1), desc(0x11000, 16, 0, 0)]).unwrap_err();
        assert_eq!(e, ChainError::ReadAfterWrite { head: 0 });
    }

    #[test]
    fn bad_indirect_tables_are_refused() {
        // An indirect table whose length is not a multiple of 16, and one
        // outside RAM: the walk yields nothing.
        let e = parse(&[desc(0x10000, 15, VRING_DESC_F_INDIRECT, 0)]).unwrap_err();
        assert_eq!(e, ChainError::Empty { head: 0 });
        let e = parse(&[desc(8 << 20, 32, VRING_DESC_F_INDIRECT, 0)]).unwrap_err();
        assert_eq!(e, ChainError::Empty { head: 0 });
    }

    /// Indirect tables nested in an indirect table, tables longer than a
    /// chain may be, and loops inside a table are refused.
    #[test]
    fn nested_long_and_looping_indirect_tables_are_refused() {
        const I: u32 = VRING_DESC_F_INDIRECT;
        let mem = memory();
        let table = 0x20000u64;
        let put = |i: u64, d| mem.write_obj(d, GuestAddress(table + 16 * i)).unwrap();
        let run = |len: u32| {
            let mut q = queue_with(&mem, 0, &[desc(table, len, I, 0)]);
            pop_chain(&mut q, &mem).unwrap().map_err(|(_, e)| e)
        };
        // A table whose first entry is itself indirect: nothing is walked.
        put(0, desc(0x30000, 32, I, 0));
        assert_eq!(run(16), Err(ChainError::Empty { head: 0 }));
        // The same after a good entry: the chain is truncated there.
        put(0, desc(0x10000, 16, N, 1));
        put(1, desc(0x30000, 32, I, 0));
        assert_eq!(run(32), Err(ChainError::Truncated { head: 0, len: 1 }));
        // A loop inside the table (0 -> 1 -> 0): the table's TTL ends it.
        put(1, desc(0x10000, 16, N, 0));
        assert!(matches!(run(32), Err(ChainError::Truncated { .. })));
        // 2048 chained entries, more than MAX_CHAIN_LEN: refused there.
        for i in 0..2048u64 {
            put(i, desc(0x10000, 1, N, (i + 1) as u16));
        }
        put(2047, desc(0x10000, 1, 0, 0));
        assert_eq!(
            run(2048 * 16),
            Err(ChainError::Truncated {
                head: 0,
                len: MAX_CHAIN_LEN
            })
        );
    }

    /// Zero-length buffers pass the RAM check wherever they point (an
    /// empty range is in any memory); a device never touches guest memory
    /// through one, which the block and balloon tests check.
    #[test]
    fn zero_length_buffers_are_accepted_anywhere() {
        let c = parse(&[desc(u64::MAX - 4, 0, 0, 0)]).unwrap();
        assert_eq!(c.buffers[0].len, 0);
    }

    #[test]
    fn a_bogus_avail_index_yields_nothing() {
        let mem = memory();
        let vq = virtio_queue::mock::MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // The driver claims 100 new chains in a 16-entry queue.
        vq.avail().idx().store(100u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(pop_chain(&mut q, &mem).is_none());
        assert_eq!(
            drain_queue(&mut q, &mem, |_| unreachable!()),
            Drained {
                bad_avail_idx: Some(100),
                ..Drained::default()
            }
        );
    }

    /// A chain the driver adds after a round popped nothing, while
    /// notifications are off (so it does not kick), is still served: a
    /// spurious kick's empty round used to end the drain and strand it
    /// (Linux's balloon then waits for it for ever).
    #[test]
    fn a_chain_added_after_an_empty_round_is_not_stranded() {
        let mem = memory();
        let vq = virtio_queue::mock::MockSplitQueue::create(&mem, GuestAddress(0), 16);
        vq.desc_table().store(0, desc(0x10000, 16, 0, 0)).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut added = false;
        let mut served = Vec::new();
        let notify = drain_queue_observed(
            &mut q,
            &mem,
            |c| {
                let c = c.unwrap();
                served.push(c.head);
                Served::Used(c.head, 0)
            },
            || {
                if !added {
                    added = true;
                    vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
                    vq.avail().idx().store(1u16.to_le());
                }
            },
        );
        assert_eq!(served, vec![0]);
        assert!(notify.notify && !notify.deferred);
        assert_eq!(q.next_used(), 1);
    }

    /// A queue the driver never set ready (a device activated without
    /// it, or notified for it) is left alone: nothing is written to guest
    /// memory where its rings would be. Its notification flags (the used
    /// ring's flags, or the avail event with EVENT_IDX) were written at
    /// its ring addresses, guest address 0 unless the driver wrote others.
    #[test]
    fn a_queue_that_is_not_ready_is_not_touched() {
        let mem = memory();
        for event_idx in [false, true] {
            mem.write_slice(&[0xa5; 0x1000], GuestAddress(0)).unwrap();
            let mut q = Queue::new(16).unwrap();
            q.set_event_idx(event_idx);
            let d = drain_queue(&mut q, &mem, |_| unreachable!());
            assert_eq!(d, Drained::default());
            let mut after = [0u8; 0x1000];
            mem.read_slice(&mut after, GuestAddress(0)).unwrap();
            let changed: Vec<usize> = (0..after.len()).filter(|&i| after[i] != 0xa5).collect();
            assert!(
                changed.is_empty(),
                "event_idx {event_idx}: guest bytes {changed:x?} written"
            );
        }
    }

    /// A 16-entry queue with rings laid out by hand (the mock's avail and
    /// used rings of a 16-entry queue overlap from avail entry 8 on), and
    /// a driver that makes chain 0 available once more each time it is
    /// called: ring entry `idx % 16`, then `idx`. Chain 0 is available once.
    fn refilled_queue(mem: &GuestMemoryMmap) -> (Queue, impl Fn(&GuestMemoryMmap)) {
        let (avail, used) = (0x1000u64, 0x2000u64);
        mem.write_obj(desc(0x10000, 16, 0, 0), GuestAddress(0))
            .unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        let add = move |mem: &GuestMemoryMmap| {
            let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
            let slot = avail + 4 + 2 * u64::from(idx % 16);
            mem.write_obj(0u16, GuestAddress(slot)).unwrap();
            mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                .unwrap();
        };
        add(mem);
        (q, add)
    }

    /// The drain after one that stopped with chains left serves them.
    fn drain_goes_on(q: &mut Queue, mem: &GuestMemoryMmap) {
        let mut next = 0;
        drain_queue(q, mem, |c| {
            next += 1;
            Served::Used(c.unwrap().head, 0)
        });
        assert_eq!(next, 1, "the chain left over");
    }

    /// A driver that makes a new chain available each time the device
    /// serves one (another vCPU can keep up with any device) does not keep
    /// the drain, and with it the event loop every device of the VM
    /// shares, going for ever: it stops after `DRAIN_BUDGET` chains and
    /// says there is more.
    #[test]
    fn a_driver_that_keeps_adding_chains_cannot_hold_the_drain() {
        let mem = memory();
        let (mut q, add) = refilled_queue(&mem);
        let mut served = 0usize;
        let d = drain_queue(&mut q, &mem, |c| {
            served += 1;
            assert!(served <= 100_000, "the drain never returned");
            add(&mem);
            Served::Used(c.unwrap().head, 0)
        });
        assert_eq!(served, DRAIN_BUDGET);
        assert_eq!(
            d,
            Drained {
                notify: true,
                deferred: false,
                more: true,
                bad_avail_idx: None
            }
        );
        drain_goes_on(&mut q, &mem);
    }

    /// Chains that each take long to serve (a huge block request, a
    /// flush) do not hold the drain for `DRAIN_BUDGET` of them: it stops
    /// once `DRAIN_TIME` went by and says there is more.
    #[test]
    fn slow_chains_cannot_hold_the_drain_for_their_whole_count() {
        let mem = memory();
        let (mut q, add) = refilled_queue(&mem);
        let each = std::time::Duration::from_millis(2);
        let mut served = 0usize;
        let start = std::time::Instant::now();
        let d = drain_queue(&mut q, &mem, |c| {
            served += 1;
            std::thread::sleep(each);
            add(&mem);
            Served::Used(c.unwrap().head, 0)
        });
        // Without the time limit: 256 chains, over half a second.
        assert!(d.more && !d.deferred, "{d:?}");
        assert!(
            served < DRAIN_BUDGET / 4,
            "{served} chains of {each:?} each served in one drain ({:?})",
            start.elapsed()
        );
        assert!(start.elapsed() >= DRAIN_TIME);
        drain_goes_on(&mut q, &mem);
    }

    /// A chain whose head index is past the queue size cannot go to the
    /// used ring (there is no such id to return): it is dropped, and the
    /// chains after it are still served. The drain used to stop at it with
    /// the driver's notifications left off (VRING_USED_F_NO_NOTIFY set),
    /// so the driver never kicked again and the queue hung for good.
    #[test]
    fn a_head_index_past_the_queue_size_does_not_hang_the_queue() {
        let mem = memory();
        let vq = virtio_queue::mock::MockSplitQueue::create(&mem, GuestAddress(0), 16);
        vq.desc_table().store(0, desc(0x10000, 16, 0, 0)).unwrap();
        for (i, head) in [16u16, 0].into_iter().enumerate() {
            vq.avail().ring().ref_at(i).unwrap().store(head.to_le());
        }
        vq.avail().idx().store(2u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        let mut seen = Vec::new();
        let d = drain_queue(&mut q, &mem, |c| {
            let head = match c {
                Ok(c) => c.head,
                Err((h, e)) => {
                    assert_eq!(e, ChainError::HeadOutOfRange { head: 16, size: 16 });
                    h
                }
            };
            seen.push(head);
            Served::Used(head, 0)
        });
        assert_eq!(seen, vec![16, 0]);
        assert_eq!(q.next_used(), 1, "chain 0 answered");
        assert!(d.notify && !d.more && !d.deferred);
        let flags: u16 = mem.read_obj(GuestAddress(q.used_ring())).unwrap();
        assert_eq!(flags, 0, "the driver's notifications are on again");
    }

    #[test]
    fn drain_completes_malformed_chains_too() {
        let mem = memory();
        let mut q = queue_with(&mem, 0, &[desc(0x10000, 16, N, 0)]);
        let mut seen = Vec::new();
        let notify = drain_queue(&mut q, &mem, |c| {
            let head = match &c {
                Ok(c) => c.head,
                Err((h, _)) => *h,
            };
            seen.push(c.is_ok());
            Served::Used(head, 0)
        });
        assert_eq!(seen, vec![false]);
        assert!(notify.notify);
        assert_eq!(q.next_used(), 1);
    }

    /// A deferred chain stays in the queue, ahead of the ones after it: the
    /// next drain pops it first, and nothing goes to the used ring until it
    /// is served.
    #[test]
    fn a_deferred_chain_is_served_first_on_the_next_drain() {
        let mem = memory();
        let vq = virtio_queue::mock::MockSplitQueue::create(&mem, GuestAddress(0), 16);
        for i in 0..2u16 {
            vq.desc_table()
                .store(i, desc(0x10000 + u64::from(i) * 16, 16, 0, 0))
                .unwrap();
            vq.avail().ring().ref_at(i.into()).unwrap().store(i.to_le());
        }
        vq.avail().idx().store(2u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        let mut seen = Vec::new();
        let mut memory_short = 2;
        let mut serve = |c: Result<Chain, (u16, ChainError)>| {
            let head = c.unwrap().head;
            seen.push(head);
            if memory_short > 0 {
                memory_short -= 1;
                return Served::Deferred;
            }
            Served::Used(head, 0)
        };
        for _ in 0..2 {
            let d = drain_queue(&mut q, &mem, &mut serve);
            assert_eq!(
                d,
                Drained {
                    notify: false,
                    deferred: true,
                    more: false,
                    bad_avail_idx: None
                }
            );
        }
        assert_eq!(q.next_used(), 0, "nothing answered while deferred");
        let d = drain_queue(&mut q, &mem, &mut serve);
        assert_eq!(
            d,
            Drained {
                notify: true,
                deferred: false,
                more: false,
                bad_avail_idx: None
            }
        );
        assert_eq!(seen, vec![0, 0, 0, 1]);
        assert_eq!(q.next_used(), 2);
    }
}
