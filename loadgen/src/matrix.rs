//! The standard comparison: the same cases against capkv and (when given) Redis, back to
//! back, plus capkv's mix x rate matrix, written as one markdown file with the machine and
//! its load.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;

use crate::plot;
use crate::redis_bench;
use crate::report;
use crate::run::{self, RunConfig, RunResult};
use crate::target::TargetKind;
use crate::workload::Mix;

#[derive(Debug, Clone)]
pub struct MatrixConfig {
    /// The base of every case: keys, value size, timings, seed, threads.
    pub base: RunConfig,
    pub capkv_addr: String,
    pub capkv_pid: Option<i32>,
    pub redis_addr: Option<String>,
    pub redis_pid: Option<i32>,
    /// A `kv-loadgen rpc-floor --engine capnp-rpc` server: the get cases are measured on it
    /// beside capkv, through capkv's client library.
    pub floor_addr: Option<String>,
    pub floor_pid: Option<i32>,
    /// A `kv-loadgen rpc-floor --engine capkv` server: the single-key get cases are measured
    /// on it through the raw client (no RPC runtime at either end but capkv's engine).
    pub engine_floor_addr: Option<String>,
    pub engine_floor_pid: Option<i32>,
    /// Open-loop rates (calls/s) for the mix matrix.
    pub rates: Vec<f64>,
    /// Connections for the mix matrix and the c=50 cases.
    pub connections: usize,
    /// Where to write SVG plots (one spectrum per case, latency against rate), and the
    /// conditions their captions carry.
    pub plot: Option<PlotTo>,
}

/// Where plots go and what their captions say.
#[derive(Debug, Clone)]
pub struct PlotTo {
    pub dir: std::path::PathBuf,
    /// Date, commit, machine, pinning: what the numbers were measured under.
    pub caption: String,
}

impl PlotTo {
    /// Writes `svg` as `name`.svg in the plot directory.
    pub fn write(&self, name: &str, svg: Result<String, plot::PlotError>) -> anyhow::Result<()> {
        let path = self.dir.join(format!("{name}.svg"));
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        std::fs::write(&path, svg?).with_context(|| format!("write {}", path.display()))
    }
}

/// The default caption: when, and on what machine.
pub fn default_caption() -> String {
    format!(
        "{}; machine: {}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        machine()
    )
}

/// Runs redis-benchmark for `case` right after kv-loadgen's Redis run `r`, for about as
/// many requests as that run did (so for about as long), and formats its row. The same
/// clients; pipelines as deep as the case's calls in flight or batch.
fn redis_benchmark_row(
    case: &Case,
    redis: &Target,
    r: &RunResult,
    base: &RunConfig,
) -> anyhow::Result<(String, redis_bench::BenchResult)> {
    let bench = redis_bench::BenchCase {
        test: if case.read_percent == 100 {
            "get"
        } else {
            "set"
        },
        clients: case.connections,
        pipeline: case.in_flight.max(case.batch),
    };
    let (result, usage) = redis_bench::run(
        &redis.addr,
        bench,
        r.keys_per_sec,
        base.duration,
        base.keys,
        base.value_size,
        redis.pid,
    )?;
    eprintln!("redis-benchmark {bench:?}: {result:?}");
    let row = report::markdown_row_redis_benchmark(case.name, bench.pipeline, &result, usage);
    Ok((row, result))
}

/// Why the wire table exists, printed above it.
const WIRE_NOTE: &str = "redis-benchmark times a request from its write to the read that \
    brings the reply; kv-loadgen's rows above time a call from the moment the generator issues \
    it to the moment it sees the answer, which adds the generator's own scheduling on both ends \
    (about half the cycle when the generator's core is saturated). The raw clients (capkv's and \
    its Redis twin) also record redis-benchmark's measure, so the cases with one call in flight \
    per connection compare on one definition here (same runs as above).";

/// How the comparison table is made, printed above it.
const SAME_MOMENT: &str = "Each case runs on capkv, then on Redis through the same generator, \
    then (rows `redis-benchmark -P N`) on Redis with its own C client, so that every ratio \
    is taken within seconds.";

/// The label of `kv-loadgen rpc-floor --engine capnp-rpc` rows.
pub const FLOOR_LABEL: &str = "capnp-rpc floor";
/// The label of `kv-loadgen rpc-floor --engine capkv` rows.
pub const ENGINE_FLOOR_LABEL: &str = "capkv-engine floor, raw";
/// The label of capkv's rows driven by the raw client.
pub const RAW_LABEL: &str = "capkv raw";
/// The label of Redis's rows driven by the raw client's twin.
pub const RAW_REDIS_LABEL: &str = "redis raw";

/// A server the comparison cases run against.
struct Target {
    label: &'static str,
    kind: TargetKind,
    addr: String,
    pid: Option<i32>,
    /// Serves gets only (the floors).
    gets_only: bool,
    /// capkv's client on capnp-rpc's `RpcSystem`, for a few cases only: the client
    /// engine's before and after in one run.
    reference_client: bool,
}

/// The cases the capnp-rpc client runs (the rest would only lengthen the run).
const REFERENCE_CLIENT_CASES: [&str; 4] =
    ["GET c=1", "GET c=50", "PUT c=50", "GET c=50 x16 in flight"];

/// The label of capkv's rows driven by its client on capnp-rpc's `RpcSystem`.
pub const REFERENCE_CLIENT_LABEL: &str = "capkv, capnp-rpc client";

impl Target {
    /// Whether this target runs `case`: the floors serve gets only, and the raw client sends
    /// single keys, without the client library's auto-batching.
    fn runs(&self, case: &Case) -> bool {
        (!self.gets_only || case.read_percent == 100)
            && (!self.kind.is_raw() || (case.batch == 1 && case.auto_batch == 0))
            && (!self.reference_client || REFERENCE_CLIENT_CASES.contains(&case.name))
    }
}

/// A named closed-loop case.
struct Case {
    name: &'static str,
    connections: usize,
    in_flight: usize,
    batch: usize,
    read_percent: u8,
    /// capkv's client auto-batching (0 = off); see `RunConfig::auto_batch`.
    auto_batch: usize,
    /// The calls in flight leave in rounds, as redis-benchmark -P sends them; see
    /// `RunConfig::rounds`.
    rounds: bool,
}

fn comparison_cases(c: usize) -> Vec<Case> {
    let case = |name, connections, in_flight, batch, read_percent| Case {
        name,
        connections,
        in_flight,
        batch,
        read_percent,
        auto_batch: 0,
        rounds: false,
    };
    vec![
        case("GET c=1", 1, 1, 1, 100),
        case("PUT c=1", 1, 1, 1, 0),
        case("GET c=50", c, 1, 1, 100),
        case("PUT c=50", c, 1, 1, 0),
        case("GET c=50 x16 in flight", c, 16, 1, 100),
        // The same gets, with capkv's client auto-batching them into getMany calls (the
        // Redis row repeats x16: the redis crate pipelines concurrent commands anyway).
        Case {
            auto_batch: 16,
            ..case("GET c=50 x16 in flight, auto-batched", c, 16, 1, 100)
        },
        case("PUT c=50 x16 in flight", c, 16, 1, 0),
        // The shape redis-benchmark -P 16 measures: 16 calls sent together, the next 16 when
        // all have answered (x16 above refills each call as it returns).
        Case {
            rounds: true,
            ..case("GET c=50 x16 in rounds", c, 16, 1, 100)
        },
        Case {
            rounds: true,
            ..case("PUT c=50 x16 in rounds", c, 16, 1, 0)
        },
        case("GET c=50 batch 16", c, 1, 16, 100),
        case("PUT c=50 batch 16", c, 1, 16, 0),
    ]
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let model = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    // Count the machine's CPUs, not this process's: kv-loadgen may be pinned to one.
    let cores = read("/proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    format!(
        "{cores} cores ({model}), {:.0} GiB",
        mem_kib as f64 / 1048576.0
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs every case (progress on stderr) and returns the markdown and the raw results.
pub fn run_matrix(m: &MatrixConfig) -> anyhow::Result<(String, Vec<(String, RunResult)>)> {
    let mut md = String::new();
    let b = &m.base;
    let _ = writeln!(md, "## Conditions\n");
    let _ = writeln!(
        md,
        "- machine: {}; load average at start: {}",
        machine(),
        loadavg()
    );
    let _ = writeln!(
        md,
        "- {} keys of {} B values ({} keys), preloaded; warm-up {} s, window {} s per case; seed {}; loadgen threads {}",
        b.keys,
        b.value_size,
        b.dist,
        b.warmup.as_secs_f64(),
        b.duration.as_secs_f64(),
        b.seed,
        b.threads
    );
    let mut results = Vec::new();

    let mut targets = vec![
        Target {
            label: "capkv",
            kind: TargetKind::Capkv,
            addr: m.capkv_addr.clone(),
            pid: m.capkv_pid,
            gets_only: false,
            reference_client: false,
        },
        Target {
            label: REFERENCE_CLIENT_LABEL,
            kind: TargetKind::Capkv,
            addr: m.capkv_addr.clone(),
            pid: m.capkv_pid,
            gets_only: false,
            reference_client: true,
        },
        // The same server without the client library's cost: what redis-benchmark's rows
        // compare with.
        Target {
            label: RAW_LABEL,
            kind: TargetKind::CapkvRaw,
            addr: m.capkv_addr.clone(),
            pid: m.capkv_pid,
            gets_only: false,
            reference_client: false,
        },
    ];
    if let Some(addr) = &m.redis_addr {
        targets.push(Target {
            label: "redis",
            kind: TargetKind::Redis,
            addr: addr.clone(),
            pid: m.redis_pid,
            gets_only: false,
            reference_client: false,
        });
    }
    if let Some(addr) = &m.redis_addr {
        // Redis through a client of the raw capkv client's shape: the two servers compared
        // with the same client work and the same timing, wire latency included.
        targets.push(Target {
            label: RAW_REDIS_LABEL,
            kind: TargetKind::RedisRaw,
            addr: addr.clone(),
            pid: m.redis_pid,
            gets_only: false,
            reference_client: false,
        });
    }
    if let Some(addr) = &m.floor_addr {
        targets.push(Target {
            label: FLOOR_LABEL,
            kind: TargetKind::Capkv,
            addr: addr.clone(),
            pid: m.floor_pid,
            gets_only: true,
            reference_client: false,
        });
    }
    if let Some(addr) = &m.engine_floor_addr {
        targets.push(Target {
            label: ENGINE_FLOOR_LABEL,
            kind: TargetKind::CapkvRaw,
            addr: addr.clone(),
            pid: m.engine_floor_pid,
            gets_only: true,
            reference_client: false,
        });
    }
    let with_redis_benchmark = m.redis_addr.is_some() && redis_bench::available();
    let _ = writeln!(
        md,
        "\n## capkv and Redis, same generator, closed loop\n\n{SAME_MOMENT}\n\n{}",
        report::MARKDOWN_HEADER
    );
    let mut wire_rows = Vec::new();
    for case in comparison_cases(m.connections) {
        let mut spectra: Vec<(&'static str, Vec<crate::stats::SpectrumPoint>)> = Vec::new();
        for t in &targets {
            if !t.runs(&case) {
                continue;
            }
            let cfg = RunConfig {
                target: t.kind,
                addr: t.addr.clone(),
                server_pid: t.pid,
                connections: case.connections,
                in_flight: case.in_flight,
                rounds: case.rounds,
                batch: case.batch,
                auto_batch: case.auto_batch,
                mix_read_percent: case.read_percent,
                rate: None,
                client_engine: if t.reference_client {
                    capkv_client::ClientEngine::CapnpRpc
                } else {
                    b.client_engine
                },
                ..b.clone()
            };
            if case.name == "GET c=1" && !t.kind.is_raw() && !t.gets_only && !t.reference_client {
                run::preload(&cfg)?;
            }
            let r = run::run(&cfg)?;
            eprintln!("{}", report::table(&r));
            let _ = writeln!(md, "{}", report::markdown_row_as(case.name, t.label, &r));
            if let Some(all) = r.all() {
                spectra.push((t.label, all.spectrum.clone()));
            }
            let one_in_flight = case.in_flight == 1 && case.batch == 1;
            let raw_row = t.label == RAW_LABEL || t.label == RAW_REDIS_LABEL;
            if let (true, Some(all)) = (one_in_flight && raw_row, r.all()) {
                if let Some(wire) = &all.wire {
                    wire_rows.push(report::markdown_row_wire(
                        case.name,
                        t.label,
                        all.ok_per_sec,
                        wire,
                    ));
                }
            }
            if t.kind == TargetKind::Redis && with_redis_benchmark {
                let (row, bench) = redis_benchmark_row(&case, t, &r, b)?;
                let _ = writeln!(md, "{row}");
                if one_in_flight {
                    wire_rows.push(report::markdown_row_wire(
                        case.name,
                        "redis-benchmark -P 1",
                        bench.rps,
                        &bench.latency(),
                    ));
                }
            }
            results.push((case.name.to_string(), r));
        }
        if let Some(p) = &m.plot {
            let series: Vec<plot::SpectrumSeries<'_>> = spectra
                .iter()
                .map(|(label, points)| plot::SpectrumSeries { label, points })
                .collect();
            let title = format!("{}: latency percentile spectrum", case.name);
            p.write(
                &format!("spectrum-{}", plot::slug(case.name)),
                plot::spectrum_svg(&title, &p.caption, &series),
            )?;
        }
    }

    if !wire_rows.is_empty() {
        let _ = writeln!(
            md,
            "\n## One call in flight: latency as redis-benchmark measures it\n\n{WIRE_NOTE}\n\n{}\n{}",
            report::WIRE_HEADER,
            wire_rows.join("\n")
        );
    }

    let _ = writeln!(
        md,
        "\n## capkv open loop: mixes x rates ({} connections; latency from the intended send time)\n\n{}",
        m.connections,
        report::MARKDOWN_HEADER
    );
    let mut steps: Vec<(String, Vec<plot::RatePoint>)> = Vec::new();
    for (mix_name, mix) in [
        ("read 95/5", Mix::READ_HEAVY),
        ("mixed 50/50", Mix::MIXED),
        ("write 5/95", Mix::WRITE_HEAVY),
    ] {
        steps.push((mix_name.to_string(), Vec::new()));
        for rate in &m.rates {
            let cfg = RunConfig {
                target: TargetKind::Capkv,
                addr: m.capkv_addr.clone(),
                server_pid: m.capkv_pid,
                connections: m.connections,
                in_flight: 1,
                batch: 1,
                mix_read_percent: mix.read_percent,
                rate: Some(*rate),
                ..b.clone()
            };
            let r = run::run(&cfg)?;
            eprintln!("{}", report::table(&r));
            let name = format!("{mix_name} @ {rate:.0}/s");
            let _ = writeln!(md, "{}", report::markdown_row(&name, &r));
            if let (Some(all), Some((_, points))) = (r.all(), steps.last_mut()) {
                points.push(plot::RatePoint::of(*rate, all));
            }
            results.push((name, r));
        }
    }
    if let Some(p) = &m.plot {
        let title = format!(
            "capkv open loop, {} connections: latency against offered rate",
            m.connections
        );
        p.write("open-loop", plot::rate_svg(&title, &p.caption, &steps))?;
    }
    let _ = writeln!(md, "\nLoad average at end: {}", loadavg());
    Ok((md, results))
}

/// A list of rates in calls/s, parsed from `1000,5000,20000` (a newtype, so that clap
/// treats it as one value rather than many).
#[derive(Debug, Clone, PartialEq)]
pub struct Rates(pub Vec<f64>);

/// Parses `1000,5000,20000`.
pub fn parse_rates(s: &str) -> Result<Rates, String> {
    s.split(',')
        .map(|r| {
            r.trim()
                .parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && r.is_finite())
                .ok_or_else(|| format!("bad rate {r:?}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Rates)
}

/// Default open-loop rates for the matrix.
pub const DEFAULT_RATES: &str = "5000,10000,20000,40000";

/// Default per-case timings for the matrix: long enough for stable percentiles, short
/// enough that the whole matrix stays around five minutes.
pub fn default_timings() -> (Duration, Duration) {
    (Duration::from_secs(2), Duration::from_secs(8))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_parse() {
        assert_eq!(
            super::parse_rates("1000, 5e3").unwrap().0,
            vec![1000.0, 5000.0]
        );
        assert!(super::parse_rates("1000,-1").is_err());
        assert!(super::parse_rates("").is_err());
    }
}
