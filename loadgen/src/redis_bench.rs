//! `redis-benchmark`, run by the matrix right after each comparison case, against the same
//! redis-server, on the same core as kv-loadgen (it inherits kv-loadgen's CPU affinity).
//!
//! Why here and not only in ../shared/peers: this VM's speed drifts by tens of percent
//! within minutes (on 2026-12-02 Redis served 83k GET/s to kv-loadgen, then 41k to
//! redis-benchmark three minutes later). A ratio between capkv and redis-benchmark is only
//! worth something when both ran within seconds of each other, which the peer scripts,
//! run after the whole matrix, cannot give.
//!
//! It sends the same key space as kv-loadgen (`-r KEYS` makes `key:%012d`, kv-loadgen's
//! key format) and values of the same size.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::procstat;

/// One redis-benchmark invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchCase {
    /// `get` or `set`.
    pub test: &'static str,
    pub clients: usize,
    /// Requests per pipeline (`-P`).
    pub pipeline: usize,
}

/// What redis-benchmark reported, in requests per second and milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct BenchResult {
    pub rps: f64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl BenchResult {
    /// Its latency figures (redis-benchmark reports no p90, p99.9 or maximum here: zero).
    pub fn latency(&self) -> crate::stats::Latency {
        crate::stats::Latency {
            mean_us: self.avg_ms * 1000.0,
            p50_us: self.p50_ms * 1000.0,
            p95_us: self.p95_ms * 1000.0,
            p99_us: self.p99_ms * 1000.0,
            ..Default::default()
        }
    }
}

/// Whether `redis-benchmark` can be run here.
pub fn available() -> bool {
    Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `case` against the Redis at `addr` (`host:port`) for about `duration`: as many
/// requests as `expected_per_sec` would answer in it (at least 1,000, at most 20 million),
/// since redis-benchmark counts requests, not time. With `server_pid`, also the server's
/// CPU and RSS over the run.
pub fn run(
    addr: &str,
    case: BenchCase,
    expected_per_sec: f64,
    duration: Duration,
    keys: u64,
    value_size: usize,
    server_pid: Option<i32>,
) -> anyhow::Result<(BenchResult, Option<procstat::Usage>)> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .with_context(|| format!("redis address {addr} has no port"))?;
    let requests = (expected_per_sec * duration.as_secs_f64()).clamp(1_000.0, 20_000_000.0) as u64;
    let before = server_pid.and_then(procstat::sample);
    let out = Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string()])
        .args(["-c", &case.clients.to_string()])
        .args(["-P", &case.pipeline.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-r", &keys.to_string()])
        .args(["-d", &value_size.to_string()])
        .args(["-t", case.test, "--csv"])
        .output()
        .context("run redis-benchmark")?;
    let after = server_pid.and_then(procstat::sample);
    anyhow::ensure!(
        out.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = parse_csv(&stdout)
        .with_context(|| format!("unexpected redis-benchmark output: {stdout}"))?;
    let usage = match (before, after) {
        (Some(b), Some(a)) => Some(procstat::usage(&b, &a, 0)),
        _ => None,
    };
    Ok((result, usage))
}

/// Reads the data line of `redis-benchmark --csv` (Redis 7: test, rps, avg, min, p50,
/// p95, p99, max).
pub fn parse_csv(out: &str) -> Option<BenchResult> {
    let line = out
        .lines()
        .find(|l| !l.starts_with("\"test\"") && l.contains(','))?;
    let fields: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|f| f.trim().trim_matches('"').parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    match fields[..] {
        [rps, avg_ms, _min, p50_ms, p95_ms, p99_ms, _max, ..] => Some(BenchResult {
            rps,
            avg_ms,
            p50_ms,
            p95_ms,
            p99_ms,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redis_7_csv() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"GET\",\"611620.81\",\"0.891\",\"0.304\",\"0.815\",\"1.423\",\"2.071\",\"2.967\"\n";
        let r = parse_csv(out).unwrap();
        assert_eq!(r.rps, 611620.81);
        assert_eq!(
            (r.avg_ms, r.p50_ms, r.p95_ms, r.p99_ms),
            (0.891, 0.815, 1.423, 2.071)
        );
        assert_eq!(parse_csv("\"test\",\"rps\"\n"), None);
        assert_eq!(parse_csv("\"GET\",\"fast\",\"1\"\n"), None);
        assert_eq!(parse_csv("\"GET\",\"1\",\"2\"\n"), None, "too few fields");
    }
}
