//! The workload guest program: position-independent x86_64 code that runs at
//! CPL3 with identity paging. The VMM copies the bytes between
//! `foliovm_workload_start` and `foliovm_workload_end` into guest memory; they
//! are never executed on the host.
//!
//! Entry: `rdi` = this vCPU's [`super::layout`] parameter block. Registers held
//! for the whole run: r15 params, r14 data base, r13 pages, r12 epoch table,
//! rbx PRNG state, r10 remaining count, r9 loop index.
//!
//! A page's content is, for each 8-byte word at guest address `a`,
//! `a ^ (epoch * 0x9E3779B97F4A7C15)`: it names both its address and its epoch,
//! so a lost write, a page mapped at the wrong place, or a zeroed page all
//! mismatch. The epoch of every page lives in a u32 table in guest memory.

use std::arch::global_asm;

// Parameter block offsets (see super::layout::Params).
global_asm!(
    r#"
    .pushsection .rodata.foliovm_workload, "a"
    .balign 16
    .globl foliovm_workload_start
foliovm_workload_start:
    mov r15, rdi
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [r15 + 0xa8], rax
    mov r14, [r15 + 0x08]
    mov r13, [r15 + 0x10]
    mov r12, [r15 + 0x18]
    mov rbx, [r15 + 0x28]
    mov r10, [r15 + 0x20]
    mov rax, [r15 + 0x00]
    cmp rax, 1
    je .Lfv_uniform
    cmp rax, 2
    je .Lfv_zipf
    cmp rax, 3
    je .Lfv_crash

    /* Sequential: r10 passes over every page. */
.Lfv_seq_pass:
    test r10, r10
    jz .Lfv_sweep
    xor r9, r9
.Lfv_seq_page:
    cmp r9, r13
    jae .Lfv_seq_next
    mov rdi, r9
    call .Lfv_touch
    inc r9
    jmp .Lfv_seq_page
.Lfv_seq_next:
    dec r10
    jmp .Lfv_seq_pass

    /* Uniform: page = (rand * npages) >> 64. */
.Lfv_uniform:
    test r10, r10
    jz .Lfv_sweep
    call .Lfv_rand
    mul r13
    mov rdi, rdx
    call .Lfv_touch
    dec r10
    jmp .Lfv_uniform

    /* Zipf: pick one of 2^k equal-mass buckets, a rank uniformly in
       [table[b], table[b+1]],
       then scatter the rank over the range: page = rank * mult mod npages. */
.Lfv_zipf:
    test r10, r10
    jz .Lfv_sweep
    call .Lfv_rand
    mov rcx, [r15 + 0x38]
    shr rax, cl
    mov rsi, [r15 + 0x30]
    mov r8d, dword ptr [rsi + rax * 4]
    mov ecx, dword ptr [rsi + rax * 4 + 4]
    sub rcx, r8
    inc rcx
    call .Lfv_rand
    mul rcx
    lea rax, [rdx + r8]
    mul qword ptr [r15 + 0x48]
    div r13
    mov rdi, rdx
    call .Lfv_touch
    dec r10
    jmp .Lfv_zipf

    /* Diagnostic: an invalid opcode at CPL3. */
.Lfv_crash:
    ud2

    /* Final sweep: verify every page ever written. First record the
       main phase's TSC ticks. */
.Lfv_sweep:
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, [r15 + 0xa8]
    mov [r15 + 0xb0], rax
    xor r9, r9
.Lfv_sweep_page:
    cmp r9, r13
    jae .Lfv_report
    mov eax, dword ptr [r12 + r9 * 4]
    test eax, eax
    jz .Lfv_sweep_next
    mov rsi, r9
    shl rsi, 12
    add rsi, r14
    call .Lfv_verify
.Lfv_sweep_next:
    inc r9
    jmp .Lfv_sweep_page

.Lfv_report:
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, [r15 + 0xa8]
    mov rsi, [r15 + 0x40]
    mov [rsi + 0x28], rax
    mov rax, [r15 + 0x80]
    mov [rsi + 0x00], rax
    mov rax, [r15 + 0x88]
    mov [rsi + 0x08], rax
    mov rax, [r15 + 0x90]
    mov [rsi + 0x10], rax
    mov rax, [r15 + 0x98]
    mov [rsi + 0x18], rax
    mov rax, [r15 + 0xa0]
    mov [rsi + 0x20], rax
    mov rax, [r15 + 0xb0]
    mov [rsi + 0x38], rax
    mov qword ptr [rsi + 0x30], 1
.Lfv_hang:
    pause
    jmp .Lfv_hang

    /* touch(rdi = page index): verify if written, then write next epoch.
       Clobbers rax rcx rdx rsi r8 r11. */
.Lfv_touch:
    mov eax, dword ptr [r12 + rdi * 4]
    mov rsi, rdi
    shl rsi, 12
    add rsi, r14
    test eax, eax
    jz .Lfv_touch_write
    call .Lfv_verify
.Lfv_touch_write:
    inc eax
    jnz .Lfv_touch_store
    inc eax
.Lfv_touch_store:
    mov dword ptr [r12 + rdi * 4], eax
    call .Lfv_write
    inc qword ptr [r15 + 0x80]
    ret

    /* rand: xorshift64* on rbx, result in rax. */
.Lfv_rand:
    mov rax, rbx
    shr rax, 12
    xor rbx, rax
    mov rax, rbx
    shl rax, 25
    xor rbx, rax
    mov rax, rbx
    shr rax, 27
    xor rbx, rax
    movabs rax, 0x2545F4914F6CDD1D
    imul rax, rbx
    ret

    /* verify(rsi = page address, eax = epoch). Keeps rax rsi rdi. */
.Lfv_verify:
    mov edx, eax
    movabs r8, 0x9E3779B97F4A7C15
    imul rdx, r8
    mov rcx, rsi
    lea r8, [rsi + 4096]
.Lfv_verify_word:
    mov r11, rcx
    xor r11, rdx
    cmp r11, qword ptr [rcx]
    jne .Lfv_verify_bad
    add rcx, 8
    cmp rcx, r8
    jb .Lfv_verify_word
    inc qword ptr [r15 + 0xa0]
    ret
.Lfv_verify_bad:
    inc qword ptr [r15 + 0x88]
    cmp qword ptr [r15 + 0x90], 0
    jne .Lfv_verify_done
    mov [r15 + 0x90], rcx
    mov r11, qword ptr [rcx]
    mov [r15 + 0x98], r11
.Lfv_verify_done:
    ret

    /* write(rsi = page address, eax = epoch). Keeps rax rsi rdi. */
.Lfv_write:
    mov edx, eax
    movabs r8, 0x9E3779B97F4A7C15
    imul rdx, r8
    mov rcx, rsi
    lea r8, [rsi + 4096]
.Lfv_write_word:
    mov r11, rcx
    xor r11, rdx
    mov qword ptr [rcx], r11
    add rcx, 8
    cmp rcx, r8
    jb .Lfv_write_word
    ret

    .globl foliovm_workload_end
foliovm_workload_end:
    .popsection
"#
);

extern "C" {
    static foliovm_workload_start: u8;
    static foliovm_workload_end: u8;
}

/// The guest program's bytes.
pub fn code() -> &'static [u8] {
    // SAFETY: both symbols are defined by the global_asm! block above in one
    // read-only section, start before end, and the bytes between them are
    // initialised constant data that lives for the whole program.
    unsafe {
        let start = std::ptr::addr_of!(foliovm_workload_start);
        let end = std::ptr::addr_of!(foliovm_workload_end);
        std::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// The word the guest writes at address `addr` for `epoch`; tests use it to
/// check guest memory from the host.
pub fn expected_word(addr: u64, epoch: u32) -> u64 {
    addr ^ u64::from(epoch).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    /// The blob is linked in whole and fits the one page it is loaded
    /// into. (That it runs where it is loaded is what every workload-guest
    /// test checks: tests/tests/workload_guest.rs.)
    #[test]
    fn code_is_present_and_fits_its_page() {
        let c = super::code();
        assert!(c.len() > 100 && c.len() < 4096, "{}", c.len());
        // Starts with `mov r15, rdi` (49 89 ff).
        assert_eq!(&c[..3], &[0x49, 0x89, 0xff]);
    }
}
