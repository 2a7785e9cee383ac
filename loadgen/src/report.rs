//! Results as a terminal table, CSV rows, a JSON document, or a markdown section.

use std::fmt::Write as _;

use crate::run::RunResult;
use crate::target::TargetKind;

/// A latency given in microseconds, as the tables show it (`850us`, `1.25ms`).
pub(crate) fn ms(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}us")
    }
}

fn errors(o: &crate::stats::OpSummary) -> String {
    if o.errors.is_empty() {
        "0".into()
    } else {
        let counts = o
            .errors
            .iter()
            .map(|(c, n)| format!("{c}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        match &o.error_latency {
            Some(l) => format!("{counts} (p50 {}, p99 {})", ms(l.p50_us), ms(l.p99_us)),
            None => counts,
        }
    }
}

/// One-line description of a run's conditions.
pub fn describe(r: &RunResult) -> String {
    let c = &r.config;
    format!(
        "{} {} conns={} in_flight={} batch={}{} mix={}/{} keys={} dist={} value={}B window={}s",
        c.target.name(),
        r.mode,
        c.connections,
        c.in_flight,
        c.batch,
        if c.auto_batch > 1 && c.target == TargetKind::Capkv {
            format!(" auto_batch={}", c.auto_batch)
        } else {
            String::new()
        },
        c.mix_read_percent,
        100 - c.mix_read_percent,
        c.keys,
        c.dist,
        c.value_size,
        r.window_secs
    )
}

/// A human table for one run.
pub fn table(r: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", describe(r));
    let _ = writeln!(
        out,
        "{:<4} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  errors",
        "op", "calls", "ok/s", "mean", "p50", "p90", "p99", "p99.9", "max"
    );
    for o in &r.ops {
        let l = &o.latency;
        let _ = writeln!(
            out,
            "{:<4} {:>9} {:>11.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {}",
            o.op,
            o.calls,
            o.ok_per_sec,
            ms(l.mean_us),
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            errors(o)
        );
    }
    if r.config.batch > 1 {
        let _ = writeln!(
            out,
            "keys/s {:.0} (batches of {})",
            r.keys_per_sec, r.config.batch
        );
    }
    if let Some(l) = r.all().and_then(|a| a.wire) {
        let _ = writeln!(
            out,
            "wire (the call's write to its reply's read, as redis-benchmark times): mean {} p50 {} p90 {} p99 {} p99.9 {} max {}",
            ms(l.mean_us),
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        );
    }
    if let Some(l) = &r.send_lag {
        let _ = writeln!(
            out,
            "send lag (in the latencies): p50 {} p99 {} max {}",
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.max_us)
        );
    }
    let _ = writeln!(out, "attempts {} retries {}", r.attempts, r.retries);
    let rps = r.all().map_or(0.0, |a| a.ok_per_sec);
    if let Some(s) = &r.server {
        let _ = writeln!(
            out,
            "server: cpu {:.0}% rss {:.1} MiB{}",
            s.cpu_percent,
            s.max_rss_bytes as f64 / 1048576.0,
            per_call_split(*s, rps)
        );
    }
    if let Some(c) = &r.client {
        if rps > 0.0 {
            let _ = writeln!(
                out,
                "client (this generator): cpu {:.0}%{}",
                c.cpu_percent,
                per_call_split(*c, rps)
            );
        }
    }
    out
}

pub const CSV_HEADER: &str = "target,mode,connections,in_flight,batch,read_percent,keys,dist,value_size,op,calls,ok_per_sec,keys_per_sec,mean_us,p50_us,p90_us,p95_us,p99_us,p999_us,max_us,errors,server_cpu_percent,server_max_rss_bytes,client_cpu_us_per_call,server_cpu_us_per_call";

/// CSV rows (one per op) for one run, without the header.
pub fn csv_rows(r: &RunResult) -> String {
    let c = &r.config;
    let mut out = String::new();
    for o in &r.ops {
        let l = &o.latency;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{},{},{}",
            c.target.name(),
            r.mode,
            c.connections,
            c.in_flight,
            c.batch,
            c.mix_read_percent,
            c.keys,
            c.dist,
            c.value_size,
            o.op,
            o.calls,
            o.ok_per_sec,
            o.ok_per_sec * c.batch as f64,
            l.mean_us,
            l.p50_us,
            l.p90_us,
            l.p95_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            o.error_count(),
            r.server.map_or(String::new(), |s| format!("{:.1}", s.cpu_percent)),
            r.server.map_or(String::new(), |s| s.max_rss_bytes.to_string()),
            r.client_cpu_us_per_call()
                .map_or(String::new(), |us| format!("{us:.2}")),
            r.server_cpu_us_per_call()
                .map_or(String::new(), |us| format!("{us:.2}")),
        );
    }
    out
}

/// A markdown table row for one run's "all" line (header: [`MARKDOWN_HEADER`]), under
/// the target's name.
pub fn markdown_row(name: &str, r: &RunResult) -> String {
    markdown_row_as(name, r.config.target.name(), r)
}

/// [`markdown_row`] under another target label (e.g. the capnp-rpc floor, which the
/// client drives as a capkv server).
pub fn markdown_row_as(name: &str, target: &str, r: &RunResult) -> String {
    let Some(a) = r.all() else {
        return String::new();
    };
    let l = &a.latency;
    let calls = a.calls.max(1) as f64;
    format!(
        "| {name} | {target} | {:.0} | {:.0} | {} | {} | {} | {} | {:.2}% | {} | {} | {} | {} |",
        a.ok_per_sec,
        r.keys_per_sec,
        ms(l.p50_us),
        ms(l.p95_us),
        ms(l.p99_us),
        ms(l.mean_us),
        a.error_count() as f64 / calls * 100.0,
        r.server
            .map_or("-".into(), |s| format!("{:.0}%", s.cpu_percent)),
        us_or_dash(r.server_cpu_us_per_call()),
        r.server.map_or("-".into(), |s| format!(
            "{:.0} MiB",
            s.max_rss_bytes as f64 / 1048576.0
        )),
        us_or_dash(r.client_cpu_us_per_call()),
    )
}

/// ", X us per call (Y in user space)" for a process `usage` busy at `rps` calls/s; empty
/// without calls. The split matters on loopback: a server's kernel time is mostly the TCP
/// path its peers pay alike, its user time is its own work.
fn per_call_split(usage: crate::procstat::Usage, rps: f64) -> String {
    match (
        crate::run::per_call_us(usage, rps),
        crate::run::per_call_user_us(usage, rps),
    ) {
        (Some(all), Some(user)) => format!(", {all:.2} us per call ({user:.2} in user space)"),
        _ => String::new(),
    }
}

fn us_or_dash(us: Option<f64>) -> String {
    us.map_or("-".into(), |us| format!("{us:.2} us"))
}

/// A markdown row ([`MARKDOWN_HEADER`]) for a redis-benchmark run: its requests per
/// second are both the calls/s and the keys/s; it reports no error count.
pub fn markdown_row_redis_benchmark(
    name: &str,
    pipeline: usize,
    r: &crate::redis_bench::BenchResult,
    server: Option<crate::procstat::Usage>,
) -> String {
    format!(
        "| {name} | redis-benchmark -P {pipeline} | {:.0} | {:.0} | {} | {} | {} | {} | - | {} | {} | {} | - |",
        r.rps,
        r.rps,
        ms(r.p50_ms * 1000.0),
        ms(r.p95_ms * 1000.0),
        ms(r.p99_ms * 1000.0),
        ms(r.avg_ms * 1000.0),
        server.map_or("-".into(), |s| format!("{:.0}%", s.cpu_percent)),
        us_or_dash(server.and_then(|s| crate::run::per_call_us(s, r.rps))),
        server.map_or("-".into(), |s| format!(
            "{:.0} MiB",
            s.max_rss_bytes as f64 / 1048576.0
        )),
    )
}

/// The header of [`markdown_row_wire`] rows.
pub const WIRE_HEADER: &str =
    "| case | target | calls/s | p50 | p95 | p99 | mean |\n|---|---|---|---|---|---|---|";

/// A row of the wire-latency table: `l` is a latency measured from the call's write to
/// its reply's read (the raw client's wire latency, or redis-benchmark's own figures).
pub fn markdown_row_wire(name: &str, target: &str, rps: f64, l: &crate::stats::Latency) -> String {
    format!(
        "| {name} | {target} | {rps:.0} | {} | {} | {} | {} |",
        ms(l.p50_us),
        ms(l.p95_us),
        ms(l.p99_us),
        ms(l.mean_us)
    )
}

pub const MARKDOWN_HEADER: &str = "| case | target | calls/s | keys/s | p50 | p95 | p99 | mean | errors | server CPU | server CPU per call | server RSS | client CPU per call |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|";
