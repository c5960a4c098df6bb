//! CPL-0 entry and the switch to CPL 3.
//!
//! CPL-0 code is emulated here (≈1 µs per instruction), so this stage is about 530
//! instructions: the page tables (0..4 GiB in 2 MiB pages, user accessible; being static data
//! they cost no instructions, so 1 GiB pages would gain nothing), GDT, TSS and IDT are data in
//! the image; only the TSS descriptor base and the 32 IDT gates are filled in at run time. Then
//! `iretq` drops to CPL 3 (IF=0, asking for IOPL 3). Everything after that runs at CPL 3.
//!
//! The nested KVM here clears IOPL on the way to CPL 3, so CPL-3 code reaches the console
//! and the power register through the monitor's MMIO windows (see [`crate::serial`]).
//!
//! Memory right after `__image_end` (see [`KSTACK_TOP`], [`USTACK_TOP`], [`FREE_START`]):
//! a 16 KiB kernel stack (exceptions only), a 1 MiB user stack, a 32 KiB stack for reporting
//! exceptions, then free RAM.

use core::arch::global_asm;

/// Offset of the kernel stack top (TSS.RSP0) from `__image_end`.
pub const KSTACK_TOP: usize = 0x4000;
/// Offset of the user stack top from `__image_end`.
pub const USTACK_TOP: usize = 0x10_4000;
/// Offset of the top of the stack that reports exceptions at CPL 3 (32 KiB).
pub const FAULT_STACK_TOP: usize = USTACK_TOP + 0x8000;
/// Offset from `__image_end` of the first byte not used by the boot stage.
pub const FREE_START: usize = FAULT_STACK_TOP;

extern "C" {
    static __image_end: u8;
}

/// Guest-physical (= virtual) address of the end of the loaded image, page aligned.
pub fn image_end() -> usize {
    core::ptr::addr_of!(__image_end) as usize
}

// Selectors: 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code, 0x28 TSS.
global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    cli
    cld
    mov r15, rsi                    // struct boot_params *, handed to user_main

    // CR0: MP=1, EM=0, TS=0 (SSE usable).
    mov rax, cr0
    and rax, -13
    or rax, 2
    mov cr0, rax
    // CR4: OSFXSR|OSXMMEXCPT on; TSD, SMEP, SMAP, PKE off (CPL 0 must run on user pages).
    mov rax, cr4
    and rax, -0x700005             // ~(TSD | SMEP | SMAP | PKE)
    or rax, 0x600
    mov cr4, rax

    // Static identity map 0..4 GiB, 2 MiB pages, user accessible.
    lea rax, [rip + tg_pml4]
    mov cr3, rax

    // 64-bit TSS descriptor: base split over the two GDT quadwords.
    lea rax, [rip + tg_tss]
    mov rdx, rax
    shl rdx, 16
    mov rcx, 0xffffff0000
    and rdx, rcx
    mov rcx, rax
    shr rcx, 24
    movzx ecx, cl
    shl rcx, 56
    or rdx, rcx
    mov rcx, 0x0000890000000067     // present, type 9 (available 64-bit TSS), limit 103
    or rdx, rcx
    mov [rip + tg_gdt + 0x28], rdx
    shr rax, 32
    mov [rip + tg_gdt + 0x30], rax

    lgdt [rip + tg_gdtr]
    push 0x08
    lea rax, [rip + .Ltg_reloaded]
    push rax
    retfq
.Ltg_reloaded:
    mov eax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov eax, 0x28
    ltr ax

    // IDT: 32 interrupt gates (CPL 0, selector 0x08) to the 16-byte-spaced stubs.
    lea rdi, [rip + tg_idt]
    lea rsi, [rip + tg_isr_stubs]
    mov ecx, 32
    mov r8, 0x00008e0000080000
.Ltg_idt_loop:
    movzx eax, si
    mov rdx, rsi
    shr rdx, 16
    movzx edx, dx
    shl rdx, 48
    or rax, rdx
    or rax, r8
    mov [rdi], rax
    mov rax, rsi
    shr rax, 32
    mov [rdi + 8], rax
    add rsi, 16
    add rdi, 16
    dec ecx
    jnz .Ltg_idt_loop
    lidt [rip + tg_idtr]

    // Drop to CPL 3: SS, RSP, RFLAGS (IOPL 3, IF 0), CS, RIP.
    lea rax, [rip + __image_end]
    add rax, {ustack}
    push 0x1b
    push rax
    push 0x3002
    push 0x23
    lea rax, [rip + tg_user_entry]
    push rax
    mov rdi, r15
    iretq

    // First CPL-3 code: clear .bss (native speed here), then enter Rust.
tg_user_entry:
    mov r12, rdi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, r12
    xor ebp, ebp
    call {user_main}
    ud2

    // Exception stubs: push a dummy error code where the CPU pushes none, then the vector.
    .balign 16
tg_isr_stubs:
    .set tg_vec, 0
    .rept 32
    .balign 16
    .if (tg_vec == 8) || (tg_vec == 10) || (tg_vec == 11) || (tg_vec == 12) || (tg_vec == 13) || (tg_vec == 14) || (tg_vec == 17) || (tg_vec == 21) || (tg_vec == 29) || (tg_vec == 30)
    .else
    push 0
    .endif
    push tg_vec
    jmp tg_isr_common
    .set tg_vec, tg_vec + 1
    .endr
    // CPL 0 cannot run compiled Rust (the emulator lacks e.g. `xorps`), so the handler only
    // records the frame and CR2 and goes to CPL 3 to report. A fault while reporting prints a
    // fixed message through the I/O ports and powers off.
tg_isr_common:
    cmp byte ptr [rip + tg_in_fault], 0
    jne .Ltg_nested_fault
    mov byte ptr [rip + tg_in_fault], 1
    lea rdi, [rip + tg_fault_info]
    xor ecx, ecx
.Ltg_copy_frame:
    mov rax, [rsp + rcx * 8]
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, 7
    jne .Ltg_copy_frame
    mov rax, cr2
    mov [rdi + 56], rax
    lea rax, [rip + __image_end]
    add rax, {fstack}
    push 0x1b
    push rax
    push 0x3002
    push 0x23
    lea rax, [rip + {report}]
    push rax
    iretq
.Ltg_nested_fault:
    lea rsi, [rip + tg_nested_msg]
.Ltg_puts:
    movzx ecx, byte ptr [rsi]
    test ecx, ecx
    jz .Ltg_poweroff
    mov edx, 0x3fd
.Ltg_wait_thr:
    in al, dx
    test al, 0x20
    jz .Ltg_wait_thr
    mov edx, 0x3f8
    mov eax, ecx
    out dx, al
    inc rsi
    jmp .Ltg_puts
.Ltg_poweroff:
    mov edx, 0x3c0
    mov eax, 0x34
    out dx, al
.Ltg_hang:
    hlt
    jmp .Ltg_hang

    .section .rodata.tg_boot, "a"
tg_nested_msg:
    .asciz "testguest: FAULT while reporting a fault\n"

    .section .data.tg_boot, "aw"
    .balign 16
    .global tg_fault_info
tg_fault_info:
    .fill 8, 8, 0                   // vector, error, rip, cs, rflags, rsp, ss, cr2
tg_in_fault:
    .byte 0

    .balign 16
tg_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        // 0x08 kernel code, 64-bit
    .quad 0x00cf92000000ffff        // 0x10 kernel data
    .quad 0x00cff2000000ffff        // 0x18 user data, DPL 3
    .quad 0x00affa000000ffff        // 0x20 user code, 64-bit, DPL 3
    .quad 0, 0                      // 0x28 TSS, filled at boot
tg_gdt_end:
    .balign 8
    .word 0, 0, 0
tg_gdtr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt

    .balign 16
tg_tss:
    .long 0
    .quad __image_end + {kstack}    // RSP0
    .quad 0, 0, 0                   // RSP1, RSP2, reserved
    .quad 0, 0, 0, 0, 0, 0, 0       // IST1..IST7
    .quad 0
    .word 0
    .word 104                       // I/O map base past the limit: no bitmap

    .balign 16
tg_idt:
    .fill 32 * 16, 1, 0
    .balign 8
    .word 0, 0, 0
tg_idtr:
    .word 32 * 16 - 1
    .quad tg_idt

    .section .data.tg_pagetables, "aw"
    .balign 4096
tg_pml4:
    .quad tg_pdpt + 0x7
    .fill 511, 8, 0
tg_pdpt:
    .quad tg_pd + 0x7
    .quad tg_pd + 0x1000 + 0x7
    .quad tg_pd + 0x2000 + 0x7
    .quad tg_pd + 0x3000 + 0x7
    .fill 508, 8, 0
tg_pd:
    .set tg_pfn, 0
    .rept 2048
    .quad (tg_pfn << 21) | 0x87     // present, writable, user, 2 MiB page
    .set tg_pfn, tg_pfn + 1
    .endr

    .text
"#,
    ustack = const USTACK_TOP,
    kstack = const KSTACK_TOP,
    user_main = sym crate::user_main,
    fstack = const FAULT_STACK_TOP,
    report = sym report_fault,
);

const EXCEPTION_NAMES: [&str; 21] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
];

/// What the CPL-0 exception stub recorded: vector, error code, the CPU's interrupt frame
/// (rip, cs, rflags, rsp, ss) and CR2.
#[repr(C)]
struct FaultInfo {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
    cr2: u64,
}

/// Reports an exception (entered at CPL 3 on the fault stack by the stub) and powers off.
extern "C" fn report_fault() -> ! {
    extern "C" {
        static tg_fault_info: FaultInfo;
    }
    // SAFETY: the stub filled `tg_fault_info` before entering here and nothing writes it
    // again (a nested fault never comes back to CPL 3).
    let f = unsafe { &*core::ptr::addr_of!(tg_fault_info) };
    let name = EXCEPTION_NAMES
        .get(f.vector as usize)
        .copied()
        .unwrap_or("exception");
    crate::println!(
        "testguest: FAULT vector={} ({}) error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} ss={:#x} cr2={:#x}",
        f.vector, name, f.error, f.rip, f.cs, f.rflags, f.rsp, f.ss, f.cr2
    );
    crate::power::off()
}
