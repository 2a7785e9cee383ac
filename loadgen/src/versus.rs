//! `kv-loadgen versus`: capkv, driven by the raw client, against Redis driven by
//! redis-benchmark, case by case in alternating rounds, summarised by the median of each
//! round's ratios.
//!
//! Why rounds: on the shared VMs these benchmarks run on, a server's rate moves by tens of
//! percent within minutes (in one matrix run of 2026-12-06, redis-benchmark -P 16 did 478k,
//! 564k and 420k GET/s in three cases of the same shape), so a single pair of runs decides
//! nothing when the two servers are within that of each other. A round runs every case on
//! both servers back to back, the order flipped every other round so that a drift favours
//! neither. The summary gives, per case, the median ratio of calls/s, of p99, and of server
//! CPU per call, with the rounds in which capkv was ahead on each.
//!
//! The p99s are timed alike: capkv's is the raw client's wire latency (from the write that
//! carried the call to the read that brought its reply), which is how redis-benchmark times
//! its requests. Server CPU per call is user + sys from /proc over each run, on both sides.

use std::fmt::Write as _;

use anyhow::Context;

use crate::redis_bench::{self, BenchCase};
use crate::report;
use crate::run::{self, RunConfig};
use crate::target::TargetKind;

/// What a `versus` run compares, and how often.
#[derive(Debug, Clone)]
pub struct VersusConfig {
    /// Keys, value size, timings, seed of every capkv run.
    pub base: RunConfig,
    pub capkv_addr: String,
    pub capkv_pid: Option<i32>,
    /// Redis's address, `host:port`.
    pub redis_addr: String,
    pub redis_pid: Option<i32>,
    /// Connections of every case.
    pub connections: usize,
    /// Rounds: each runs every case once on each server.
    pub rounds: usize,
    /// How Redis is driven.
    pub redis_client: RedisClient,
    /// The cases run, by [`Case::key`]; empty runs all of them.
    pub cases: Vec<String>,
}

/// Redis's side of a `versus` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisClient {
    /// redis-benchmark, Redis's own client: the bars are stated against it.
    Benchmark,
    /// kv-loadgen's raw Redis client (`--target redis-raw`): the same client work as capkv's
    /// raw client, so the ratio is the servers' alone (with thousands of connections the
    /// generator's core is the limit, and redis-benchmark's costs differ from kv-loadgen's).
    Raw,
}

/// One case, in both clients' terms.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    /// What `--cases` calls it.
    key: &'static str,
    in_flight: usize,
    /// capkv's calls leave in rounds of `in_flight`, as redis-benchmark -P sends them.
    rounds: bool,
    get: bool,
}

/// The cases of the server-side engine's bars: one call in flight, and 16 (refilled one by
/// one, and in rounds, redis-benchmark's own shape), for gets and puts.
const CASES: [Case; 6] = [
    Case {
        name: "GET, 1 in flight",
        key: "get1",
        in_flight: 1,
        rounds: false,
        get: true,
    },
    Case {
        name: "PUT, 1 in flight",
        key: "put1",
        in_flight: 1,
        rounds: false,
        get: false,
    },
    Case {
        name: "GET, 16 in flight",
        key: "get16",
        in_flight: 16,
        rounds: false,
        get: true,
    },
    Case {
        name: "PUT, 16 in flight",
        key: "put16",
        in_flight: 16,
        rounds: false,
        get: false,
    },
    Case {
        name: "GET, 16 in rounds",
        key: "get16r",
        in_flight: 16,
        rounds: true,
        get: true,
    },
    Case {
        name: "PUT, 16 in rounds",
        key: "put16r",
        in_flight: 16,
        rounds: true,
        get: false,
    },
];

/// One server's figures in one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Side {
    pub calls_per_sec: f64,
    pub p99_us: f64,
    /// `None` when the server's PID was not given, or the run too short to measure it.
    pub cpu_us_per_call: Option<f64>,
    /// The part of it in user space: the server's own code, without the kernel's share,
    /// which moves with how the server's work is batched as much as with the server.
    pub user_us_per_call: Option<f64>,
}

/// capkv's and Redis's figures for one case in one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub capkv: Side,
    pub redis: Side,
}

impl Pair {
    /// capkv's calls/s over Redis's: above 1 is ahead.
    pub fn rate_ratio(&self) -> f64 {
        self.capkv.calls_per_sec / self.redis.calls_per_sec.max(1e-9)
    }

    /// capkv's p99 over Redis's: below 1 is ahead.
    pub fn p99_ratio(&self) -> f64 {
        self.capkv.p99_us / self.redis.p99_us.max(1e-9)
    }

    /// capkv's server CPU per call over Redis's: below 1 is ahead.
    pub fn cpu_ratio(&self) -> Option<f64> {
        Some(self.capkv.cpu_us_per_call? / self.redis.cpu_us_per_call?)
    }

    /// capkv's server CPU per call in user space over Redis's: below 1 is ahead.
    pub fn user_ratio(&self) -> Option<f64> {
        Some(self.capkv.user_us_per_call? / self.redis.user_us_per_call?)
    }
}

/// The median of `v` (the mean of the two middle values when their number is even);
/// `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One summary cell: the median ratio and the rounds on capkv's side of 1.0 (`ahead`
/// says which side that is for this figure).
fn summary_cell(ratios: &[f64], ahead: impl Fn(f64) -> bool) -> String {
    match median(ratios) {
        None => "-".into(),
        Some(m) => format!(
            "{m:.2}x ({} of {})",
            ratios.iter().filter(|r| ahead(**r)).count(),
            ratios.len()
        ),
    }
}

/// The summary table: per case, each figure's median ratio and in how many rounds capkv
/// was ahead on it.
pub fn summary(cases: &[(&str, Vec<Pair>)]) -> String {
    let mut md = String::from(
        "| case | calls/s, capkv / Redis: median (rounds >= 1) | p99, capkv / Redis: median (rounds <= 1) | server CPU per call, capkv / Redis: median (rounds <= 1) | its user-space part, capkv / Redis: median (rounds <= 1) |\n|---|---|---|---|---|\n",
    );
    for (name, pairs) in cases {
        let rate: Vec<f64> = pairs.iter().map(Pair::rate_ratio).collect();
        let p99: Vec<f64> = pairs.iter().map(Pair::p99_ratio).collect();
        let cpu: Vec<f64> = pairs.iter().filter_map(Pair::cpu_ratio).collect();
        let user: Vec<f64> = pairs.iter().filter_map(Pair::user_ratio).collect();
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} |",
            summary_cell(&rate, |r| r >= 1.0),
            summary_cell(&p99, |r| r <= 1.0),
            summary_cell(&cpu, |r| r <= 1.0),
            summary_cell(&user, |r| r <= 1.0),
        );
    }
    md
}

/// CPU per call, with its user-space part in brackets.
fn cpu(side: &Side) -> String {
    match (side.cpu_us_per_call, side.user_us_per_call) {
        (None, _) => "-".into(),
        (Some(all), None) => format!("{all:.2} us"),
        (Some(all), Some(user)) => format!("{all:.2} us ({user:.2})"),
    }
}

/// One round's row of a case.
fn round_row(round: usize, name: &str, p: &Pair) -> String {
    format!(
        "| {round} | {name} | {:.0} | {:.0} | {:.2}x | {} | {} | {} | {} |",
        p.capkv.calls_per_sec,
        p.redis.calls_per_sec,
        p.rate_ratio(),
        report::ms(p.capkv.p99_us),
        report::ms(p.redis.p99_us),
        cpu(&p.capkv),
        cpu(&p.redis),
    )
}

/// A CPU figure, unless the run was too short for /proc's clock ticks to see any.
fn measured(cpu_us_per_call: Option<f64>) -> Option<f64> {
    cpu_us_per_call.filter(|v| *v > 0.0)
}

/// One run of `case` on capkv through the raw client.
fn run_capkv(v: &VersusConfig, case: &Case) -> anyhow::Result<Side> {
    run_raw(v, case, TargetKind::CapkvRaw, &v.capkv_addr, v.capkv_pid)
}

/// One run of `case` through one of kv-loadgen's raw clients (`target`), on the server at
/// `addr`.
fn run_raw(
    v: &VersusConfig,
    case: &Case,
    target: TargetKind,
    addr: &str,
    pid: Option<i32>,
) -> anyhow::Result<Side> {
    let cfg = RunConfig {
        target,
        addr: addr.to_string(),
        server_pid: pid,
        connections: v.connections,
        in_flight: case.in_flight,
        rounds: case.rounds,
        batch: 1,
        auto_batch: 0,
        mix_read_percent: if case.get { 100 } else { 0 },
        rate: None,
        ..v.base.clone()
    };
    let r = run::run(&cfg)?;
    let all = r.all().context("a run without results")?;
    anyhow::ensure!(
        all.errors.is_empty(),
        "{target:?} answered {} with errors: {:?}",
        case.name,
        all.errors
    );
    Ok(Side {
        calls_per_sec: all.ok_per_sec,
        p99_us: all.wire.as_ref().unwrap_or(&all.latency).p99_us,
        cpu_us_per_call: measured(r.server_cpu_us_per_call()),
        user_us_per_call: measured(r.server_user_us_per_call()),
    })
}

/// One run of `case` on Redis through redis-benchmark, sized to last about as long as a
/// capkv run at `expected` calls/s.
fn run_redis(v: &VersusConfig, case: &Case, expected: f64) -> anyhow::Result<Side> {
    if v.redis_client == RedisClient::Raw {
        return run_raw(v, case, TargetKind::RedisRaw, &v.redis_addr, v.redis_pid);
    }
    let bench = BenchCase {
        test: if case.get { "get" } else { "set" },
        clients: v.connections,
        pipeline: case.in_flight,
    };
    let (r, usage) = redis_bench::run(
        &v.redis_addr,
        bench,
        expected,
        v.base.duration,
        v.base.keys,
        v.base.value_size,
        v.redis_pid,
    )?;
    Ok(Side {
        calls_per_sec: r.rps,
        p99_us: r.p99_ms * 1000.0,
        cpu_us_per_call: measured(usage.and_then(|u| run::per_call_us(u, r.rps))),
        user_us_per_call: measured(usage.and_then(|u| run::per_call_user_us(u, r.rps))),
    })
}

/// The cases named in `keys` (every case when empty), in [`CASES`]' order.
fn chosen(keys: &[String]) -> anyhow::Result<Vec<Case>> {
    if let Some(unknown) = keys
        .iter()
        .find(|k| !CASES.iter().any(|c| c.key == k.as_str()))
    {
        let known: Vec<&str> = CASES.iter().map(|c| c.key).collect();
        anyhow::bail!("no case {unknown:?}; the cases are {}", known.join(", "));
    }
    Ok(CASES
        .iter()
        .filter(|c| keys.is_empty() || keys.iter().any(|k| k == c.key))
        .copied()
        .collect())
}

/// Preloads both servers, runs the rounds (progress on stderr) and returns the markdown:
/// every round's rows, then the summary.
pub fn run_versus(v: &VersusConfig) -> anyhow::Result<String> {
    anyhow::ensure!(v.rounds > 0, "--repeat must be at least 1");
    let cases = chosen(&v.cases)?;
    anyhow::ensure!(
        v.redis_client == RedisClient::Raw || redis_bench::available(),
        "redis-benchmark is not on PATH (apt-get install -y redis-tools)"
    );
    for (target, addr) in [
        (TargetKind::Capkv, &v.capkv_addr),
        (TargetKind::Redis, &v.redis_addr),
    ] {
        run::preload(&RunConfig {
            target,
            addr: addr.clone(),
            ..v.base.clone()
        })?;
    }
    let mut rows = Vec::new();
    let mut pairs: Vec<(&str, Vec<Pair>)> = cases.iter().map(|c| (c.name, Vec::new())).collect();
    for round in 1..=v.rounds {
        for (case, (_, done)) in cases.iter().zip(pairs.iter_mut()) {
            // Every other round Redis goes first; its run is sized by capkv's last rate.
            let pair = match (round % 2 == 0, done.last()) {
                (true, Some(last)) => {
                    let redis = run_redis(v, case, last.capkv.calls_per_sec)?;
                    let capkv = run_capkv(v, case)?;
                    Pair { capkv, redis }
                }
                _ => {
                    let capkv = run_capkv(v, case)?;
                    let redis = run_redis(v, case, capkv.calls_per_sec)?;
                    Pair { capkv, redis }
                }
            };
            let row = round_row(round, case.name, &pair);
            eprintln!("{row}");
            rows.push(row);
            done.push(pair);
        }
    }
    let redis_client = match v.redis_client {
        RedisClient::Benchmark => "redis-benchmark",
        RedisClient::Raw => "kv-loadgen's raw Redis client",
    };
    let mut md = format!(
        "Rounds: {}; {} connections; Redis driven by {redis_client}; {} keys, {}-byte values; capkv runs: {} s warm-up, {} s measured.\n\n",
        v.rounds,
        v.connections,
        v.base.keys,
        v.base.value_size,
        v.base.warmup.as_secs_f64(),
        v.base.duration.as_secs_f64()
    );
    md.push_str(&summary(&pairs));
    md.push_str(
        "\n| round | case | capkv raw calls/s | Redis calls/s | ratio | capkv p99 (wire) | Redis p99 | capkv CPU per call (user) | Redis CPU per call (user) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        md.push_str(&row);
        md.push('\n');
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(capkv: (f64, f64, f64), redis: (f64, f64, f64)) -> Pair {
        let side = |(calls_per_sec, p99_us, cpu): (f64, f64, f64)| Side {
            calls_per_sec,
            p99_us,
            cpu_us_per_call: Some(cpu),
            user_us_per_call: Some(cpu / 4.0),
        };
        Pair {
            capkv: side(capkv),
            redis: side(redis),
        }
    }

    #[test]
    fn cases_are_chosen_by_key_in_their_order_and_an_unknown_one_is_refused() {
        let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let names = |cs: Vec<Case>| cs.iter().map(|c| c.key).collect::<Vec<_>>();
        assert_eq!(chosen(&[]).map(names).unwrap().len(), CASES.len());
        assert_eq!(
            chosen(&keys(&["put16r", "get1"])).map(names).unwrap(),
            ["get1", "put16r"]
        );
        let e = chosen(&keys(&["get1", "get2"])).unwrap_err().to_string();
        assert!(e.contains("\"get2\"") && e.contains("get16r"), "{e}");
    }

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn each_figure_counts_the_rounds_on_capkv_s_side() {
        // Round 1: capkv faster, lower p99, more CPU; round 2: slower, higher p99, less CPU;
        // round 3: faster, equal p99 (counts as ahead), less CPU.
        let pairs = vec![
            pair((120.0, 400.0, 6.0), (100.0, 500.0, 5.0)),
            pair((90.0, 600.0, 4.0), (100.0, 500.0, 5.0)),
            pair((110.0, 500.0, 4.5), (100.0, 500.0, 5.0)),
        ];
        let md = summary(&[("GET", pairs)]);
        let row = md.lines().nth(2).unwrap();
        assert_eq!(
            row,
            "| GET | 1.10x (2 of 3) | 1.00x (2 of 3) | 0.90x (2 of 3) | 0.90x (2 of 3) |"
        );
    }

    #[test]
    fn a_server_without_a_pid_has_no_cpu_ratio() {
        let mut p = pair((1.0, 1.0, 1.0), (1.0, 1.0, 1.0));
        p.redis.cpu_us_per_call = None;
        p.redis.user_us_per_call = None;
        assert_eq!(p.cpu_ratio(), None);
        let md = summary(&[("GET", vec![p])]);
        assert!(md.lines().nth(2).unwrap().ends_with("| - | - |"));
        assert!(round_row(1, "GET", &p).ends_with("| 1.00 us (0.25) | - |"));
    }
}
