//! Misuse of the public API: every bad request is refused with an error
//! naming it, and leaves the manager as it was.

mod common;

use common::*;
use mem::{BackendError, GuestAddress};

#[test]
fn a_backend_whose_mapping_fails_leaves_the_vm_able_to_get_one() {
    let mm = manager(4 * MIB, 1);
    let vm = mm.create_vm("a").unwrap();
    // Valid as a layout (no wrap), far too large to map.
    let e = mm.backend(vm, &[(GuestAddress(0), 1 << 60)]).unwrap_err();
    assert!(matches!(e, BackendError::Mmap(_)), "{e:?}");
    let b = mm
        .backend(vm, &[(GuestAddress(0), 4 * MIB)])
        .expect("a second, valid backend request");
    let ram = Ram::of(&*b);
    ram.write(0, 7);
    assert_eq!(ram.read(0), 7);
    drop(b);
    mm.destroy_vm(vm).unwrap();
    settle_and_check(&mm);
}
