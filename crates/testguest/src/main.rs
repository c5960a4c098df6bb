//! ftvm's freestanding test guest.
//!
//! Loaded by ftvm's monitor as an ELF kernel (Linux 64-bit boot protocol). A tiny CPL-0 stage
//! ([`boot`]) switches to CPL 3, where all real work runs at native speed even on hosts whose
//! KVM emulates CPL-0 code. It polls everything and never enables interrupts.
//!
//! Command line: `[ftvm.tsc_khz=K] [ftvm.ip=A.B.C.D/N] [ftvm.gw=A.B.C.D] -- JOB ARGS...` with
//! JOB one of `counter`, `dirty RATE_PAGES_PER_S WORKING_SET_MIB`, `blk-pattern [SECTORS]`,
//! `tcp-echo PORT`, `kv PORT`, `serial-rx`, `poweroff`, `fault` (see [`jobs`]). Every job prints
//! `testguest: job NAME running` once it is up; bad input prints `testguest: error: ...` and
//! powers off, as does any CPU exception (`testguest: FAULT ...`).
#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod clock;
mod cmdline;
mod heap;
mod jobs;
mod net;
mod power;
mod rt;
mod serial;
mod virtio;

use core::panic::PanicInfo;

use cmdline::{Args, BootParams};

/// First Rust code, at CPL 3 with IOPL 3 (entered from [`boot`]); `boot_params` is the zero
/// page's address.
extern "C" fn user_main(boot_params: usize) -> ! {
    serial::init();
    let params = BootParams::at(boot_params);
    let cmdline = params.cmdline();
    println!("testguest: started at CPL 3, cmdline: {}", cmdline);
    let mem = heap::init(&params).unwrap_or_else(|e| fatal!("{}", e));
    let args = Args::parse(cmdline).unwrap_or_else(|e| fatal!("{}", e));
    clock::init(args.tsc_khz.unwrap_or(clock::DEFAULT_TSC_KHZ));
    println!(
        "testguest: tsc_khz={}{} heap={} MiB at {:#x} spare={} MiB",
        clock::tsc_khz(),
        if args.tsc_khz.is_some() {
            ""
        } else {
            " (default)"
        },
        mem.heap_size >> 20,
        mem.heap_start,
        mem.spare_size >> 20
    );
    for d in virtio::probe() {
        println!(
            "testguest: virtio slot {} device id {}",
            d.slot, d.device_id
        );
    }
    jobs::run(&args)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("testguest: error: panic: {}", info);
    power::off()
}
