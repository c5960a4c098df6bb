//! The jobs a test guest can run, chosen by the words after ` -- ` on the command line.

mod blk;
mod counter;
mod dirty;
mod echo;
mod kv;
mod serial_rx;
mod spin;

use crate::cmdline::Args;
use crate::{fatal, println};

/// Number of concurrent TCP connections the servers accept.
const TCP_SLOTS: usize = 16;

/// Runs the job named on the command line; never returns.
pub fn run(args: &Args) -> ! {
    let Some((&name, rest)) = args.job.split_first() else {
        fatal!("no job: append ` -- JOB [ARGS]` to the command line (jobs: counter, dirty, blk-pattern, tcp-echo, kv, serial-rx, poweroff, fault)");
    };
    match name {
        "counter" => counter::run(expect_args(name, rest, 0)),
        "dirty" => {
            let a = expect_args(name, rest, 2);
            dirty::run(number(name, a[0]), number(name, a[1]))
        }
        "blk-pattern" => {
            let a = expect_at_most(name, rest, 2);
            blk::run(
                a.first().map_or(2048, |s| number(name, s)),
                a.get(1).map_or(0, |s| number(name, s)),
            )
        }
        "tcp-echo" => echo::run(args, port(name, expect_args(name, rest, 1)[0])),
        "kv" => {
            let a = expect_between(name, rest, 1, 2);
            kv::run(
                args,
                port(name, a[0]),
                a.get(1).map_or(0, |r| number(name, r)),
            )
        }
        "spin" => {
            let a = expect_at_most(name, rest, 1);
            spin::run(a.first().map_or(0, |r| number(name, r)))
        }
        "serial-rx" => {
            expect_args(name, rest, 0);
            serial_rx::run()
        }
        "reboot" => {
            // `reboot [AFTER_MS]`: counts (as `counter`) for AFTER_MS first.
            count_for(name, rest);
            println!("testguest: rebooting");
            crate::power::reboot()
        }
        "poweroff" => {
            // `poweroff [AFTER_MS]`: counts (as `counter`) for AFTER_MS first.
            count_for(name, rest);
            println!("testguest: powering off");
            crate::power::off()
        }
        "fault" => {
            // For testing the exception path: #UD, reported by the CPL-0 handler.
            expect_args(name, rest, 0);
            running(name);
            // SAFETY: `ud2` only raises #UD, whose handler reports it and powers off.
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        _ => fatal!("unknown job `{}`", name),
    }
}

/// Prints `counter N` every 10 ms for the optional first argument's milliseconds.
fn count_for(job: &str, rest: &[&'static str]) {
    let a = expect_at_most(job, rest, 1);
    let ms = a.first().map_or(0, |s| number(job, s));
    running(job);
    let mut ticker = crate::clock::Ticker::new(10_000);
    for n in 1..=ms / 10 {
        println!("counter {}", n);
        ticker.wait();
    }
}

/// Prints the line tests wait for.
fn running(name: &str) {
    println!("testguest: job {} running", name);
}

fn expect_args<'a>(job: &str, args: &'a [&'static str], n: usize) -> &'a [&'static str] {
    if args.len() != n {
        fatal!("job {} takes {} argument(s), got {:?}", job, n, args);
    }
    args
}

fn expect_between<'a>(
    job: &str,
    args: &'a [&'static str],
    min: usize,
    max: usize,
) -> &'a [&'static str] {
    if args.len() < min || args.len() > max {
        fatal!(
            "job {} takes {} to {} arguments, got {:?}",
            job,
            min,
            max,
            args
        );
    }
    args
}

fn expect_at_most<'a>(job: &str, args: &'a [&'static str], n: usize) -> &'a [&'static str] {
    if args.len() > n {
        fatal!(
            "job {} takes at most {} argument(s), got {:?}",
            job,
            n,
            args
        );
    }
    args
}

fn number(job: &str, s: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|_| fatal!("job {}: `{}` is not a number", job, s))
}

fn port(job: &str, s: &str) -> u16 {
    match s.parse() {
        Ok(p) if p > 0 => p,
        _ => fatal!("job {}: `{}` is not a TCP port", job, s),
    }
}
