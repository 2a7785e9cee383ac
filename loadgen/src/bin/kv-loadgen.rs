//! `kv-loadgen`: load runs and the comparison matrix (see `kv-loadgen --help`).
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use capkv_loadgen::matrix::{self, MatrixConfig, Rates};
use capkv_loadgen::plot;
use capkv_loadgen::report;
use capkv_loadgen::run::{self, RunConfig};
use capkv_loadgen::target::TargetKind;
use capkv_loadgen::versus;
use capkv_loadgen::workload::{KeyDist, Mix};
use clap::{Args, Parser, Subcommand};

// capnp-rpc makes several small heap objects per call (promises, question and answer
// entries, message segments): malloc and free were 8% of kv-server's profile, and
// mimalloc gave 10-18% more calls/s at 50 connections in back-to-back runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for capkv (and Redis, driven by the same generator).
#[derive(Parser, Debug)]
#[command(name = "kv-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One run, or one run per rate with --rps.
    Run(RunArgs),
    /// The standard comparison matrix; writes a markdown results file.
    Matrix(MatrixArgs),
    /// capkv through the raw client against Redis through redis-benchmark, case by case
    /// in alternating rounds, with the median of each round's ratios (markdown on stdout).
    Versus(VersusArgs),
    /// A bare server answering every get and getMany with fixed entries at once, on capkv's
    /// RPC engine or capnp-rpc's: what the RPC runtime alone costs per call (a benchmark
    /// anchor; serves until stopped).
    RpcFloor(RpcFloorArgs),
    /// Plots durable-put results (bench/durable.sh's CSV) as SVG.
    PlotDurable(PlotDurableArgs),
    /// One writer putting to a prefix as fast as it can, many watchers of that prefix:
    /// events delivered per second and put-to-delivery latency.
    WatchFanout(WatchFanoutArgs),
    /// Leases granted, each with one key put on it, never kept alive: cycles per second,
    /// and whether every key expired one TTL and a second later.
    LeaseChurn(LeaseChurnArgs),
}

#[derive(Args, Debug)]
struct LeaseChurnArgs {
    /// The capkv server.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Grant-and-put loops per connection.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Each lease's TTL.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Args, Debug)]
struct WatchFanoutArgs {
    /// The capkv server.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// Watchers of the writer's prefix.
    #[arg(long, default_value_t = 1_000)]
    watchers: usize,
    /// Connections the watchers share.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// How long the writer writes (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Bytes per value (at least 8: each carries its send time).
    #[arg(long, default_value_t = 100)]
    value_size: usize,
}

#[derive(Args, Debug)]
struct PlotDurableArgs {
    /// CSV of `target,writers,puts_per_sec,p99_ms` rows (bench/durable.sh with
    /// DURABLE_CSV set).
    #[arg(long)]
    csv: PathBuf,
    #[command(flatten)]
    plot: PlotArgs,
}

#[derive(Args, Debug, Clone)]
struct PlotArgs {
    /// Write SVG plots of the results into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The conditions (date, commit, machine, pinning) each plot's caption states; by
    /// default the date and the machine.
    #[arg(long)]
    plot_caption: Option<String>,
}

impl PlotArgs {
    fn to(&self) -> Option<matrix::PlotTo> {
        self.plot.as_ref().map(|dir| matrix::PlotTo {
            dir: dir.clone(),
            caption: self
                .plot_caption
                .clone()
                .unwrap_or_else(matrix::default_caption),
        })
    }
}

#[derive(Args, Debug)]
struct VersusArgs {
    #[command(flatten)]
    common: Common,
    /// capkv address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// capkv server PID (CPU per call).
    #[arg(long)]
    server_pid: Option<i32>,
    /// Redis address (host:port).
    #[arg(long)]
    redis_addr: String,
    /// Redis server PID (CPU per call).
    #[arg(long)]
    redis_pid: Option<i32>,
    #[arg(short = 'c', long, default_value_t = 50)]
    connections: usize,
    /// Rounds, each running every case once on each server (each server goes first in
    /// every other round: an even count evens the order out).
    #[arg(long, default_value_t = 6)]
    repeat: usize,
    /// How Redis is driven: redis-benchmark, or kv-loadgen's raw Redis client (the same
    /// client work as capkv's side).
    #[arg(long, value_enum, default_value = "benchmark")]
    redis_client: versus::RedisClient,
    /// The cases to run (default all): get1, put1, get16, put16, get16r, put16r (16 in
    /// flight; r: in rounds, as redis-benchmark -P sends them).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
}

#[derive(Args, Debug)]
struct RpcFloorArgs {
    /// Address to listen on (port 0 picks one; the address is printed as a JSON line).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Size of the value every get answers.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// The RPC engine: capkv (kv-server's default) or capnp-rpc (`RpcSystem`).
    #[arg(long, default_value = "capkv")]
    engine: capkv_loadgen::floor::FloorEngine,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Key distribution: uniform, zipf (s=0.99) or zipf:S.
    #[arg(long, default_value = "uniform")]
    dist: KeyDist,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Warm-up before measuring, e.g. 2s.
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Measured duration, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Seed of the key/value/mix generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Loadgen worker threads (each owns a share of the connections).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Per-call deadline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    plot: PlotArgs,
    /// Bearer token for capkv.
    #[arg(
        long,
        env = "CAPKV_TOKEN",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    token: String,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// capkv, capkv-raw, redis, redis-raw or etcd.
    #[arg(long, default_value = "capkv")]
    target: TargetKind,
    /// Server address (etcd: the members' client URLs, comma-separated).
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// Keys per batch of --preload (127 or fewer for capkv on etcd and the etcd target:
    /// etcd's transactions hold at most 128 operations).
    #[arg(long, default_value_t = 500)]
    preload_batch: u64,
    /// capkv: every write carries a fresh idempotency key, as the client library's
    /// `Client` makes them by default (the server records each write's outcome, so that a
    /// retry cannot apply it twice): what exactly-once writes cost.
    #[arg(long)]
    idempotent: bool,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// Calls in flight per connection (closed loop).
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Closed loop in rounds, as redis-benchmark -P: each connection sends its in-flight
    /// calls together and starts the next round when all have answered (without it, each
    /// call is replaced as soon as it returns).
    #[arg(long)]
    rounds: bool,
    /// Keys per call (batches: getMany/putMany, MGET/MSET).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// capkv: concurrent gets of one connection leave as one getMany of at most N keys
    /// (the client's auto-batching; 0 = off).
    #[arg(long, default_value_t = 0)]
    auto_batch: usize,
    /// read (95/5), mixed (50/50), write (5/95), get, put, or the read percentage.
    #[arg(long, default_value = "read")]
    mix: Mix,
    /// Open loop: comma-separated total rates in calls/s, one run each. Absent: closed loop.
    #[arg(long, value_parser = matrix::parse_rates)]
    rps: Option<Rates>,
    /// Open loop: calls a connection may have outstanding before due calls are dropped.
    #[arg(long, default_value_t = 1024)]
    max_outstanding: usize,
    /// Load every key once before the run.
    #[arg(long)]
    preload: bool,
    /// PID of the server, to report its CPU and RSS.
    #[arg(long)]
    server_pid: Option<i32>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the results as CSV to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct MatrixArgs {
    #[command(flatten)]
    common: Common,
    /// capkv address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// capkv server PID (CPU/RSS).
    #[arg(long)]
    server_pid: Option<i32>,
    /// Redis address, to run the same cases against Redis.
    #[arg(long)]
    redis_addr: Option<String>,
    /// Redis server PID (CPU/RSS).
    #[arg(long)]
    redis_pid: Option<i32>,
    /// Address of a `kv-loadgen rpc-floor` server, to run the get cases against it.
    #[arg(long)]
    floor_addr: Option<String>,
    /// rpc-floor server PID (CPU/RSS).
    #[arg(long)]
    floor_pid: Option<i32>,
    /// Address of a `kv-loadgen rpc-floor --engine capkv` server, to run the single-key get
    /// cases against it with the raw client.
    #[arg(long)]
    engine_floor_addr: Option<String>,
    /// Its PID (CPU/RSS).
    #[arg(long)]
    engine_floor_pid: Option<i32>,
    /// Open-loop rates for the mix matrix, calls/s.
    #[arg(long, default_value = matrix::DEFAULT_RATES, value_parser = matrix::parse_rates)]
    rps: Rates,
    /// Connections of the c=50 cases and of the mix matrix.
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// Markdown results file.
    #[arg(long, default_value = "bench/results.md")]
    out: PathBuf,
    /// Also write every run as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn base(c: &Common) -> RunConfig {
    let (warmup, duration) = matrix::default_timings();
    RunConfig {
        keys: c.keys,
        dist: c.dist,
        value_size: c.value_size,
        warmup: c.warmup.unwrap_or(warmup),
        duration: c.duration.unwrap_or(duration),
        seed: c.seed,
        threads: c.threads,
        timeout: c.timeout,
        token: c.token.clone(),
        progress: std::io::stderr().is_terminal(),
        ..RunConfig::default()
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(a) => {
            let cfg = RunConfig {
                target: a.target,
                addr: a.addr.clone(),
                connections: a.connections,
                in_flight: a.in_flight,
                rounds: a.rounds,
                batch: a.batch,
                auto_batch: a.auto_batch,
                mix_read_percent: a.mix.read_percent,
                server_pid: a.server_pid,
                max_outstanding: a.max_outstanding,
                preload_batch: a.preload_batch,
                idempotent: a.idempotent,
                ..base(&a.common)
            };
            if a.preload {
                run::preload(&cfg).context("preload")?;
            }
            let rates: Vec<Option<f64>> = match &a.rps {
                Some(r) => r.0.iter().copied().map(Some).collect(),
                None => vec![None],
            };
            let mut results = Vec::new();
            for rate in rates {
                let r = run::run(&RunConfig {
                    rate,
                    ..cfg.clone()
                })?;
                print!("{}", report::table(&r));
                results.push(r);
            }
            if let Some(p) = a.common.plot.to() {
                plot_run(&p, &cfg, &results)?;
            }
            if let Some(path) = &a.json {
                std::fs::write(path, serde_json::to_string_pretty(&results)?)
                    .with_context(|| format!("write {}", path.display()))?;
            }
            if let Some(path) = &a.csv {
                let mut csv = format!("{}\n", report::CSV_HEADER);
                results
                    .iter()
                    .for_each(|r| csv.push_str(&report::csv_rows(r)));
                std::fs::write(path, csv).with_context(|| format!("write {}", path.display()))?;
            }
        }
        Command::RpcFloor(a) => {
            anyhow::ensure!(
                a.value_size <= capkv::Limits::default().max_value_bytes,
                "value size must be at most {} bytes",
                capkv::Limits::default().max_value_bytes
            );
            let listener = std::net::TcpListener::bind(a.listen)
                .with_context(|| format!("listen on {}", a.listen))?;
            capkv_loadgen::floor::serve(listener, a.engine, a.value_size, |addr| {
                // The line kv-server prints, so scripts find the address the same way.
                eprintln!(r#"{{"message":"listening","addr":"{addr}"}}"#);
            })?;
        }
        Command::WatchFanout(a) => {
            let cfg = capkv_loadgen::fanout::FanoutConfig {
                addr: a.addr,
                watchers: a.watchers,
                connections: a.connections,
                duration: a.duration,
                value_size: a.value_size,
            };
            let r = capkv_loadgen::fanout::run(&cfg)?;
            print!("{}", capkv_loadgen::fanout::report(&cfg, &r));
            anyhow::ensure!(
                r.anomalies == 0,
                "{} events missed or repeated",
                r.anomalies
            );
        }
        Command::LeaseChurn(a) => {
            let cfg = capkv_loadgen::churn::ChurnConfig {
                addr: a.addr,
                connections: a.connections,
                in_flight: a.in_flight,
                ttl: a.ttl,
                duration: a.duration,
            };
            let r = capkv_loadgen::churn::run(&cfg)?;
            print!("{}", capkv_loadgen::churn::report(&cfg, &r));
            anyhow::ensure!(r.left == 0, "{} keys outlived their leases", r.left);
        }
        Command::PlotDurable(a) => {
            let p = a.plot.to().context("--plot DIR: where to write the plot")?;
            let csv = std::fs::read_to_string(&a.csv)
                .with_context(|| format!("read {}", a.csv.display()))?;
            let targets = parse_durable_csv(&csv)?;
            p.write(
                "durable",
                plot::durable_svg(
                    "Durable puts: WAL or AOF synced before each acknowledgement",
                    &p.caption,
                    &targets,
                ),
            )?;
        }
        Command::Versus(a) => {
            let mut base = base(&a.common);
            // Shorter runs than the matrix's: many rounds say more than long runs here.
            base.warmup = a.common.warmup.unwrap_or(Duration::from_secs(1));
            base.duration = a.common.duration.unwrap_or(Duration::from_secs(4));
            let md = versus::run_versus(&versus::VersusConfig {
                base,
                capkv_addr: a.addr.clone(),
                capkv_pid: a.server_pid,
                redis_addr: a.redis_addr.clone(),
                redis_pid: a.redis_pid,
                connections: a.connections,
                rounds: a.repeat,
                redis_client: a.redis_client,
                cases: a.cases.clone(),
            })?;
            println!("{md}");
        }
        Command::Matrix(a) => {
            let m = MatrixConfig {
                base: base(&a.common),
                capkv_addr: a.addr.clone(),
                capkv_pid: a.server_pid,
                redis_addr: a.redis_addr.clone(),
                redis_pid: a.redis_pid,
                floor_addr: a.floor_addr.clone(),
                floor_pid: a.floor_pid,
                engine_floor_addr: a.engine_floor_addr.clone(),
                engine_floor_pid: a.engine_floor_pid,
                rates: a.rps.0.clone(),
                connections: a.connections,
                plot: a.common.plot.to(),
            };
            let (md, results) = matrix::run_matrix(&m)?;
            if let Some(dir) = a.out.parent() {
                std::fs::create_dir_all(dir).ok();
            }
            std::fs::write(&a.out, &md).with_context(|| format!("write {}", a.out.display()))?;
            println!("{md}");
            if let Some(path) = &a.json {
                let runs: Vec<_> = results
                    .iter()
                    .map(|(n, r)| serde_json::json!({"case": n, "result": r}))
                    .collect();
                std::fs::write(path, serde_json::to_string_pretty(&runs)?)
                    .with_context(|| format!("write {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// `kv-loadgen run --plot`: one spectrum per run (its operations side by side) and, for
/// an open-loop series, latency against offered rate.
fn plot_run(p: &matrix::PlotTo, cfg: &RunConfig, results: &[run::RunResult]) -> anyhow::Result<()> {
    for (i, r) in results.iter().enumerate() {
        let series: Vec<plot::SpectrumSeries<'_>> = r
            .ops
            .iter()
            .filter(|o| o.op != "all" || r.ops.len() == 1)
            .map(|o| plot::SpectrumSeries {
                label: o.op,
                points: &o.spectrum,
            })
            .collect();
        let title = format!(
            "{} c={} x{}{}: latency percentile spectrum",
            cfg.target.name(),
            cfg.connections,
            cfg.in_flight,
            r.config
                .rate
                .map(|x| format!(" @ {x:.0}/s"))
                .unwrap_or_default()
        );
        p.write(
            &format!("spectrum-{}", i + 1),
            plot::spectrum_svg(&title, &p.caption, &series),
        )?;
    }
    let steps: Vec<plot::RatePoint> = results
        .iter()
        .filter_map(|r| Some(plot::RatePoint::of(r.config.rate?, r.all()?)))
        .collect();
    if !steps.is_empty() {
        let title = format!(
            "{} open loop, {} connections: latency against offered rate",
            cfg.target.name(),
            cfg.connections
        );
        let mix = format!("{}% reads", cfg.mix_read_percent);
        p.write(
            "open-loop",
            plot::rate_svg(&title, &p.caption, &[(mix, steps)]),
        )?;
    }
    Ok(())
}

/// Reads bench/durable.sh's CSV (`target,writers,puts_per_sec,p99_ms`) into one series
/// per target.
fn parse_durable_csv(csv: &str) -> anyhow::Result<Vec<(String, Vec<plot::DurablePoint>)>> {
    let mut targets: Vec<(String, Vec<plot::DurablePoint>)> = Vec::new();
    for (n, line) in csv
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [target, writers, puts, p99] = f[..] else {
            anyhow::bail!(
                "line {}: want target,writers,puts_per_sec,p99_ms: {line:?}",
                n + 1
            );
        };
        if writers == "writers" {
            continue; // the header
        }
        let point = plot::DurablePoint {
            writers: writers
                .parse()
                .with_context(|| format!("line {}: writers", n + 1))?,
            puts_per_sec: puts
                .parse()
                .with_context(|| format!("line {}: puts_per_sec", n + 1))?,
            p99_ms: p99
                .parse()
                .with_context(|| format!("line {}: p99_ms", n + 1))?,
        };
        match targets.iter_mut().find(|(t, _)| t == target) {
            Some((_, points)) => points.push(point),
            None => targets.push((target.to_string(), vec![point])),
        }
    }
    anyhow::ensure!(!targets.is_empty(), "no durable results in the CSV");
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_csv_reads_one_series_per_target_and_refuses_bad_rows() {
        let t = parse_durable_csv(
            "target,writers,puts_per_sec,p99_ms\ncapkv,1,1212.0,1.133\n\
             redis,1,1500.5,0.9\ncapkv,50,20000.0,4.5\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].0, "capkv");
        assert_eq!(t[0].1.len(), 2);
        assert_eq!(t[0].1[1].writers, 50);
        assert!(parse_durable_csv("capkv,1,x,1.0\n").is_err());
        assert!(parse_durable_csv("a,b\n").is_err());
        assert!(parse_durable_csv("target,writers,puts_per_sec,p99_ms\n").is_err());
    }

    #[test]
    fn every_flag_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let run = Cli::try_parse_from([
            "kv-loadgen",
            "run",
            "--target",
            "redis",
            "-c",
            "8",
            "--in-flight",
            "4",
            "--batch",
            "2",
            "--mix",
            "70",
            "--dist",
            "zipf:1.1",
            "--rps",
            "100,200",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--value-size",
            "10",
            "--keys",
            "50",
            "--preload",
            "--json",
            "x.json",
            "--csv",
            "x.csv",
            "--server-pid",
            "1",
            "--threads",
            "2",
        ])
        .unwrap();
        match run.command {
            Command::Run(a) => assert_eq!(a.rps.unwrap().0, vec![100.0, 200.0]),
            _ => panic!("not run"),
        }
        let m = Cli::try_parse_from(["kv-loadgen", "matrix", "--redis-addr", "127.0.0.1:6379"])
            .unwrap();
        match m.command {
            Command::Matrix(a) => assert_eq!(a.rps.0.len(), 4),
            _ => panic!("not matrix"),
        }
    }
}
