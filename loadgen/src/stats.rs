//! Latency histograms (HdrHistogram, nanoseconds, 3 significant digits), error counts by
//! code, and the summaries computed from them.
//!
//! Each worker thread records into its own [`Recorder`] (no sharing on the hot path); the
//! run merges them at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::workload::OpKind;

/// Largest latency a histogram holds; longer ones are clamped to it (and still counted).
const MAX_LATENCY_NS: u64 = 120_000_000_000;

fn histogram() -> Histogram<u64> {
    // 1 ns .. 120 s at 3 significant digits: fixed bounds, so it never reallocates.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant histogram bounds are valid")
}

/// Latencies and errors of one operation kind. Successes and errors are kept apart: under
/// overload the admitted calls' latency and how fast refusals come are different answers.
#[derive(Clone)]
pub struct OpStats {
    /// Successful calls.
    pub latency: Histogram<u64>,
    /// Failed calls (any code).
    pub error_latency: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Successful calls' wire latency, where the target measures one (the raw client: from
    /// the write carrying the call to the read bringing its reply, as redis-benchmark
    /// times its requests); empty otherwise.
    pub wire: Histogram<u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        Self {
            latency: histogram(),
            error_latency: histogram(),
            wire: histogram(),
            errors: BTreeMap::new(),
        }
    }
}

impl OpStats {
    fn add(&mut self, other: &OpStats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.error_latency.add(&other.error_latency);
        let _ = self.wire.add(&other.wire);
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }
}

/// Everything one worker measured.
#[derive(Clone, Default)]
pub struct Recorder {
    pub get: OpStats,
    pub put: OpStats,
    /// Open loop only: how late each call left compared with its intended send time
    /// (timer granularity and client backlog); already included in the latencies.
    pub send_lag: Option<Histogram<u64>>,
    /// Calls issued (each carries `batch` keys).
    pub calls: u64,
    /// Calls retried (the client library does not retry yet: always 0).
    pub retries: u64,
}

impl Recorder {
    pub fn for_open_loop() -> Self {
        Self {
            send_lag: Some(histogram()),
            ..Self::default()
        }
    }

    fn op(&mut self, kind: OpKind) -> &mut OpStats {
        match kind {
            OpKind::Get => &mut self.get,
            OpKind::Put => &mut self.put,
        }
    }

    pub fn record(&mut self, kind: OpKind, latency: Duration, error: Option<&str>) {
        self.calls += 1;
        let ns = (latency.as_nanos() as u64).clamp(1, MAX_LATENCY_NS);
        let op = self.op(kind);
        // Cannot fail: the value is clamped into the histogram's bounds.
        match error {
            None => {
                let _ = op.latency.record(ns);
            }
            Some(code) => {
                let _ = op.error_latency.record(ns);
                *op.errors.entry(code.to_string()).or_default() += 1;
            }
        }
    }

    /// A successful call's wire latency (see [`OpStats::wire`]).
    pub fn record_wire(&mut self, kind: OpKind, wire: Duration) {
        let _ = self
            .op(kind)
            .wire
            .record((wire.as_nanos() as u64).clamp(1, MAX_LATENCY_NS));
    }

    /// A due call the load generator itself could not send (its connection's backlog was
    /// full): an error of the generator, counted, with no latency (no server answered).
    pub fn record_dropped(&mut self, kind: OpKind) {
        self.calls += 1;
        *self
            .op(kind)
            .errors
            .entry("client_backlog".into())
            .or_default() += 1;
    }

    pub fn record_lag(&mut self, lag: Duration) {
        if let Some(h) = &mut self.send_lag {
            let _ = h.record((lag.as_nanos() as u64).clamp(1, MAX_LATENCY_NS));
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.get.add(&other.get);
        self.put.add(&other.put);
        match (&mut self.send_lag, &other.send_lag) {
            (Some(a), Some(b)) => {
                let _ = a.add(b);
            }
            (None, Some(b)) => self.send_lag = Some(b.clone()),
            _ => {}
        }
        self.calls += other.calls;
        self.retries += other.retries;
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Self {
            mean_us: h.mean() / 1e3,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p95_us: us(h.value_at_quantile(0.95)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// One point of a latency percentile spectrum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SpectrumPoint {
    /// 0-100.
    pub percentile: f64,
    pub us: f64,
}

/// The percentiles a spectrum is sampled at: evenly spaced on HdrHistogram's log scale of
/// 1/(1-p), up to the maximum.
const SPECTRUM_PERCENTILES: [f64; 16] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.75, 99.9, 99.95, 99.99, 99.995, 99.999,
    100.0,
];

/// The latency percentile spectrum of `h`: only the percentiles its sample count resolves
/// (p with at least one sample above it), then the maximum.
pub fn spectrum(h: &Histogram<u64>) -> Vec<SpectrumPoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let n = h.len() as f64;
    SPECTRUM_PERCENTILES
        .iter()
        .filter(|&&p| p == 100.0 || n * (1.0 - p / 100.0) >= 1.0 - 1e-9)
        .map(|&p| SpectrumPoint {
            percentile: p,
            us: h.value_at_quantile(p / 100.0) as f64 / 1e3,
        })
        .collect()
}

/// One operation kind's results.
#[derive(Debug, Clone, Serialize)]
pub struct OpSummary {
    pub op: &'static str,
    /// Calls completed in the measured window (ok or not).
    pub calls: u64,
    /// Successful calls per second.
    pub ok_per_sec: f64,
    pub errors: BTreeMap<String, u64>,
    /// Latency of the successful calls.
    pub latency: Latency,
    /// Latency of the failed calls (how fast a refusal arrives), when there were any.
    pub error_latency: Option<Latency>,
    /// The successful calls' latency percentile spectrum (for plots).
    pub spectrum: Vec<SpectrumPoint>,
    /// Their wire latency, when the target measured it (see [`OpStats::wire`]).
    pub wire: Option<Latency>,
}

impl OpSummary {
    pub fn of(op: &'static str, s: &OpStats, window: Duration) -> Self {
        let ok = s.latency.len();
        Self {
            op,
            calls: ok + s.errors.values().sum::<u64>(),
            ok_per_sec: ok as f64 / window.as_secs_f64().max(1e-9),
            errors: s.errors.clone(),
            latency: Latency::of(&s.latency),
            error_latency: (!s.error_latency.is_empty()).then(|| Latency::of(&s.error_latency)),
            spectrum: spectrum(&s.latency),
            wire: (!s.wire.is_empty()).then(|| Latency::of(&s.wire)),
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The summaries of a recorder: get, put, and both together.
pub fn summarize(r: &Recorder, window: Duration) -> Vec<OpSummary> {
    let mut all = OpStats::default();
    all.add(&r.get);
    all.add(&r.put);
    let mut out = Vec::new();
    for (name, s) in [("get", &r.get), ("put", &r.put)] {
        if !s.latency.is_empty() || !s.error_latency.is_empty() {
            out.push(OpSummary::of(name, s, window));
        }
    }
    out.push(OpSummary::of("all", &all, window));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut r = Recorder::default();
        // 1..=1000 µs, once each.
        for us in 1..=1000u64 {
            r.record(OpKind::Get, Duration::from_micros(us), None);
        }
        let l = Latency::of(&r.get.latency);
        let close = |a: f64, b: f64| (a - b).abs() / b < 0.01;
        assert!(close(l.p50_us, 500.0), "{l:?}");
        assert!(close(l.p90_us, 900.0), "{l:?}");
        assert!(close(l.p99_us, 990.0), "{l:?}");
        assert!(close(l.max_us, 1000.0), "{l:?}");
        assert!(close(l.mean_us, 500.5), "{l:?}");
    }

    #[test]
    fn a_spectrum_holds_the_percentiles_its_samples_resolve() {
        let mut r = Recorder::default();
        for us in 1..=1000u64 {
            r.record(OpKind::Get, Duration::from_micros(us), None);
        }
        let s = spectrum(&r.get.latency);
        let ps: Vec<f64> = s.iter().map(|p| p.percentile).collect();
        // 1,000 samples resolve 99.9% but not 99.95%; the maximum closes it.
        assert!(ps.contains(&99.9) && !ps.contains(&99.95), "{ps:?}");
        assert_eq!(ps.last(), Some(&100.0));
        assert!(s.windows(2).all(|w| w[0].us <= w[1].us), "{s:?}");
        assert!((s.last().unwrap().us - 1000.0).abs() < 2.0);
        assert!(spectrum(&r.put.latency).is_empty());
    }

    #[test]
    fn merge_adds_counts_and_errors() {
        let mut a = Recorder::default();
        let mut b = Recorder::for_open_loop();
        a.record(OpKind::Get, Duration::from_micros(10), None);
        b.record(OpKind::Put, Duration::from_micros(20), Some("overloaded"));
        b.record(OpKind::Put, Duration::from_secs(10_000), None);
        b.record_lag(Duration::from_micros(5));
        a.merge(&b);
        assert_eq!(a.calls, 3);
        assert_eq!(a.put.errors["overloaded"], 1);
        assert_eq!(a.send_lag.as_ref().unwrap().len(), 1);
        let s = summarize(&a, Duration::from_secs(1));
        let all = s.iter().find(|s| s.op == "all").unwrap();
        assert_eq!(all.calls, 3);
        assert_eq!(all.error_count(), 1);
        assert!((all.ok_per_sec - 2.0).abs() < 1e-9);
        // The refusal's latency is kept apart from the successes'.
        let e = all.error_latency.expect("one error");
        assert!((e.max_us - 20.0).abs() < 0.1, "{e:?}");
        assert!(all.latency.p50_us > 9.0 && all.latency.p50_us < 11.0);
        assert!(
            all.latency.max_us <= MAX_LATENCY_NS as f64 / 1e3 * 1.001,
            "clamped"
        );
    }
}
