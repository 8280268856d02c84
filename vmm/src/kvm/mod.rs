//! The KVM VM: memslots, in-kernel irqchip and PIT, supported CPUID.

pub mod vcpu;

use crate::arch::layout::KVM_TSS_START;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use mem::RamRegion;

/// Errors from KVM VM setup; each names the ioctl that failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you root?)")]
    Open(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS stopped at this MSR.
    #[error("KVM refused to set boot MSR {0:#x}")]
    MsrRefused(u32),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// A KVM VM file descriptor with the system fd it came from.
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
    /// Memslot of each guest RAM region now (they change on relocation).
    slots: std::sync::Mutex<Vec<(u32, RamRegion)>>,
}

impl KvmVm {
    /// Open /dev/kvm and create a VM.
    ///
    /// # Errors
    /// [`KvmError::Open`] or [`KvmError::Ioctl`].
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        Ok(KvmVm {
            kvm,
            fd,
            slots: Default::default(),
        })
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The most vCPUs this KVM allows.
    pub fn max_vcpus(&self) -> u32 {
        let n = self.kvm.check_extension_int(Cap::MaxVcpus);
        if n > 0 {
            n as u32
        } else {
            self.kvm.check_extension_int(Cap::NrVcpus).max(1) as u32
        }
    }

    /// KVM_GET_SUPPORTED_CPUID.
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Register one memslot per guest RAM region.
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    ///
    /// # Safety
    /// Every region's host mapping must stay mapped for as long as this VM
    /// exists (the caller keeps the memory backend alive longer than the VM).
    pub unsafe fn set_memory(&self, regions: &[RamRegion]) -> Result<(), KvmError> {
        for r in regions {
            // SAFETY: the caller's contract.
            unsafe { self.add_slot(*r)? };
        }
        Ok(())
    }

    /// Register `r` in a free memslot.
    ///
    /// # Safety
    /// As [`KvmVm::set_memory`].
    unsafe fn add_slot(&self, r: RamRegion) -> Result<(), KvmError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (0..)
            .find(|s| slots.iter().all(|(t, _)| t != s))
            .unwrap_or(0);
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: r.guest_base.raw(),
            memory_size: r.size,
            userspace_addr: r.host_addr.raw() as u64,
        };
        // SAFETY: the caller guarantees the host range stays mapped while
        // the slot exists; regions do not overlap (GuestMemoryBackend
        // invariant, kept by relocation), so KVM accepts the slot.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        slots.push((slot, r));
        Ok(())
    }

    /// Replace the memslots of `old` regions by slots for `new` ones (a
    /// relocation's switch). The vCPUs must be out of `KVM_RUN`.
    ///
    /// # Errors
    /// [`KvmError::Ioctl`]; on error the old slots are restored.
    ///
    /// # Safety
    /// The `new` host ranges stay mapped while their slots exist. The
    /// memory manager unmaps a region only after the relocation that
    /// retired it switched its slot away, or when the VM's memory goes,
    /// after this KVM VM.
    pub unsafe fn switch_memory(
        &self,
        old: &[RamRegion],
        new: &[RamRegion],
    ) -> Result<(), KvmError> {
        let removed: Vec<(u32, RamRegion)> = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let (gone, keep) = slots.drain(..).partition(|(_, r)| old.contains(r));
            *slots = keep;
            gone
        };
        for (slot, r) in &removed {
            let region = kvm_userspace_memory_region {
                slot: *slot,
                flags: 0,
                guest_phys_addr: r.guest_base.raw(),
                memory_size: 0,
                userspace_addr: r.host_addr.raw() as u64,
            };
            // SAFETY: deleting a slot (size 0) makes KVM drop its mapping
            // of the old range; it touches no memory.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        for (i, r) in new.iter().enumerate() {
            // SAFETY: the caller's contract.
            if let Err(e) = unsafe { self.add_slot(*r) } {
                // The new slots added so far go too: a caller whose switch
                // failed may unmap the new ranges, and a slot left on one
                // would let the guest reach whatever is mapped there next.
                self.delete_slots(&new[..i]);
                for (_, o) in &removed {
                    // SAFETY: the old ranges are still mapped (the switch
                    // failed, so the relocation is undone).
                    let _ = unsafe { self.add_slot(*o) };
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Delete the memslots of `regions` (best effort: a failed deletion is
    /// left for the VM's teardown).
    fn delete_slots(&self, regions: &[RamRegion]) {
        let gone: Vec<(u32, RamRegion)> = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let (gone, keep) = slots.drain(..).partition(|(_, r)| regions.contains(r));
            *slots = keep;
            gone
        };
        for (slot, r) in gone {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: r.guest_base.raw(),
                memory_size: 0,
                userspace_addr: r.host_addr.raw() as u64,
            };
            // SAFETY: deleting a slot (size 0) makes KVM drop its mapping of
            // the range; it touches no memory.
            let _ = unsafe { self.fd.set_user_memory_region(region) };
        }
    }

    /// The in-kernel PIC/IOAPIC/LAPIC and PIT that a Linux guest needs.
    ///
    /// # Errors
    /// [`KvmError::Ioctl`].
    pub fn setup_irqchip(&self) -> Result<(), KvmError> {
        self.fd
            .set_tss_address(KVM_TSS_START.raw() as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))
    }
}
