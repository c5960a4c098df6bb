//! `ftvm bench faults`: the FT fault matrix (testbed::faults) on the two-node test bed, N rounds
//! per scenario, then a false-failover run under a CPU and disk hog; a table per scenario,
//! totals, and with `--json` one object on the last line.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use testbed::faults::{self, Outcome, Scenario};
use testbed::TwoNodeBed;

/// Options of `ftvm bench faults`.
pub struct FaultsArgs {
    /// Rounds per scenario.
    pub rounds: usize,
    /// Only these scenarios (all when empty).
    pub scenarios: Vec<String>,
    /// Seconds of the host hog in the false-failover run (0: skip it).
    pub hog_secs: u64,
    /// Print one JSON object on the last line.
    pub json: bool,
    /// Prefix of the test bed's network namespaces.
    pub bed_prefix: String,
}

/// Runs the benchmark.
pub fn run(args: FaultsArgs) -> anyhow::Result<i32> {
    if !testbed::can_run_vms() {
        anyhow::bail!("ftvm bench faults needs root and /dev/kvm (it builds network namespaces)");
    }
    let scenarios: Vec<Scenario> = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios
            .iter()
            .map(|s| Scenario::from_name(s))
            .collect::<anyhow::Result<_>>()?
    };
    let prefix = &args.bed_prefix;
    TwoNodeBed::cleanup_stale(prefix)?;
    let bed = TwoNodeBed::up(prefix).context("cannot build the test bed")?;
    let dir = testbed::Scratch::new("bench-faults")?;

    let mut all: Vec<Outcome> = Vec::new();
    let mut by_name = serde_json::Map::new();
    for &sc in &scenarios {
        let mut outcomes = Vec::new();
        let mut errors = Vec::new();
        for round in 0..args.rounds.max(1) {
            let sub = dir.path(&format!("{}-{round}", sc.name()));
            match faults::run(&bed, &sub, sc) {
                Ok(o) => outcomes.push(o),
                Err(e) => errors.push(format!("round {round}: {e:#}")),
            }
        }
        print_table(sc, &outcomes, &errors);
        by_name.insert(sc.name().into(), scenario_json(&outcomes, &errors));
        all.extend(outcomes);
    }

    let hog = if args.hog_secs > 0 {
        let v = faults::false_failovers(
            &bed,
            &dir.path("false-failovers"),
            Duration::from_secs(args.hog_secs),
        )
        .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        println!(
            "--- false failovers under stress-ng --cpu 2 --io 1 --hdd 1 ({} s, 100 ms timeout)",
            args.hog_secs
        );
        for (k, val) in v.as_object().into_iter().flatten() {
            println!("{k:>24}: {val}");
        }
        v
    } else {
        Value::Null
    };

    let totals = faults::totals(&all);
    println!("--- totals over {} scenario runs", all.len());
    for (k, v) in totals.as_object().into_iter().flatten() {
        println!("{k:>24}: {v}");
    }
    println!("must be 0: acked_writes_lost, two_live_copies, resurrections, false_failovers");
    if args.json {
        let mut out = totals.as_object().cloned().unwrap_or_default();
        out.insert("scenarios".into(), Value::Object(by_name));
        out.insert("false_failovers".into(), hog["false_failovers"].clone());
        out.insert("false_failover_run".into(), hog);
        println!("{}", Value::Object(out));
    }
    Ok(0)
}

fn scenario_json(outcomes: &[Outcome], errors: &[String]) -> Value {
    let sum = |f: fn(&Outcome) -> usize| outcomes.iter().map(f).sum::<usize>();
    let failover: Vec<f64> = outcomes.iter().filter_map(|o| o.failover_ms).collect();
    let judged: Vec<bool> = outcomes.iter().filter_map(|o| o.protected_at_end).collect();
    json!({
        "rounds": outcomes.len() + errors.len(),
        "acked_writes": sum(|o| o.acked_writes),
        "acked_writes_lost": sum(|o| o.acked_writes_lost),
        "two_live_copies": sum(Outcome::two_copies),
        "resurrections": sum(|o| o.resurrections),
        "failover_ms": faults::summary(&failover),
        "protected_at_end": format!("{}/{}", judged.iter().filter(|p| **p).count(), judged.len()),
        "errors": errors,
        "runs": outcomes.iter().map(Outcome::to_json).collect::<Vec<_>>(),
    })
}

fn print_table(sc: Scenario, outcomes: &[Outcome], errors: &[String]) {
    println!("--- {}", sc.name());
    println!(
        "{:>5} {:>7} {:>5} {:>9} {:>12} {:>11} {:>10}  runs on the LAN",
        "round", "acked", "lost", "two-live", "resurrected", "failover", "protected"
    );
    for (i, o) in outcomes.iter().enumerate() {
        println!(
            "{:>5} {:>7} {:>5} {:>9} {:>12} {:>11} {:>10}  {}",
            i,
            o.acked_writes,
            o.acked_writes_lost,
            o.two_copies(),
            o.resurrections,
            o.failover_ms
                .map(|v| format!("{v:.0} ms"))
                .unwrap_or_else(|| "-".into()),
            match o.protected_at_end {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            },
            o.runs
        );
        for v in o.violations() {
            println!("      ! {v}");
        }
    }
    for e in errors {
        println!("      error: {e}");
    }
}
