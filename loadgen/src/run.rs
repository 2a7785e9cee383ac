//! One load run: worker threads, connections, the closed or open loop, and the merge.
//!
//! Threads: `threads` OS threads, each a current-thread runtime with a `LocalSet` that owns
//! its share of the connections (capkv's `LocalClient` is `!Send`, and a thread per
//! connection would measure the scheduler, not the server).
//!
//! - **Closed loop** (like `redis-benchmark -c`): each connection keeps `in_flight` calls
//!   outstanding; a call is sent when the previous one on its slot returns. Latency is
//!   send to reply.
//! - **Rounds** (`rounds`, like `redis-benchmark -P N`): each connection sends its
//!   `in_flight` calls together and starts the next round when all of them have answered.
//!   The closed loop instead refills each slot as its call returns, so its calls trickle in
//!   one or two at a time; rounds send them in one write, the shape redis-benchmark's
//!   pipelining measures. Latency is still send to each call's own reply.
//! - **Open loop**: calls are due at a fixed total rate, spread evenly over connections.
//!   Latency is measured from the *intended* send time, so a server that falls behind
//!   shows its queueing instead of hiding it (no coordinated omission). A connection keeps
//!   at most `max_outstanding` calls; past that a due call is not sent and counts as a
//!   `client_backlog` error. One dispatcher per thread keeps the clock: it sleeps until
//!   just before a call is due, then yields until it is (tokio's timer alone would send up
//!   to ~1 ms late). The time between intended and actual send is reported as `send_lag`;
//!   it is part of the latencies.
//!
//! Only calls sent inside the measured window (after warm-up, before the end) are counted.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use capkv_client::{ClientEngine, ClientOptions};
use serde::Serialize;
use tokio::time::Instant;

use crate::procstat;
use crate::stats::{summarize, Latency, OpSummary, Recorder};
use crate::target::{Conn, TargetKind};
use crate::workload::{key, KeyDist, Mix, OpGen, OpKind, VALUE_POOL};

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub target: TargetKind,
    pub addr: String,
    #[serde(skip)]
    pub token: String,
    pub connections: usize,
    /// Calls outstanding per connection (closed loop).
    pub in_flight: usize,
    /// Closed loop in rounds: the `in_flight` calls of a connection leave together and the
    /// next round starts when all have answered (see the module docs).
    pub rounds: bool,
    /// Keys per call; above 1 the call is a batch (getMany/putMany, MGET/MSET).
    pub batch: usize,
    /// capkv: the client's auto-batching, at most this many concurrent gets of one
    /// connection per `getMany` (0 = off). Redis is unaffected: the redis crate's
    /// multiplexed connection already pipelines concurrent commands.
    pub auto_batch: usize,
    pub mix_read_percent: u8,
    pub keys: u64,
    #[serde(serialize_with = "display")]
    pub dist: KeyDist,
    pub value_size: usize,
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    pub seed: u64,
    /// Open loop: calls per second over all connections. `None` = closed loop.
    pub rate: Option<f64>,
    pub threads: usize,
    #[serde(skip)]
    pub server_pid: Option<i32>,
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
    /// Open loop: calls a connection may have outstanding before due calls are dropped.
    pub max_outstanding: usize,
    #[serde(skip)]
    pub progress: bool,
    /// capkv: the client's RPC runtime (capkv's engine unless `CAPKV_CLIENT_RPC_ENGINE`
    /// says otherwise; the matrix also runs a few cases on capnp-rpc's, the before).
    #[serde(skip)]
    pub client_engine: ClientEngine,
    /// Keys per batch of the preload (etcd takes at most 128 operations a transaction:
    /// capkv on etcd and the etcd target need 127 or fewer).
    #[serde(skip)]
    pub preload_batch: u64,
    /// capkv: each measured write carries a fresh idempotency key (the preload's do not).
    pub idempotent: bool,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            target: TargetKind::Capkv,
            addr: "127.0.0.1:7070".into(),
            token: String::new(),
            connections: 50,
            in_flight: 1,
            rounds: false,
            batch: 1,
            auto_batch: 0,
            mix_read_percent: Mix::READ_HEAVY.read_percent,
            keys: 100_000,
            dist: KeyDist::Uniform,
            value_size: 100,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            seed: 1,
            rate: None,
            threads: 1,
            server_pid: None,
            timeout: Duration::from_secs(5),
            max_outstanding: 1024,
            progress: false,
            client_engine: ClientEngine::from_env(),
            preload_batch: 500,
            idempotent: false,
        }
    }
}

impl RunConfig {
    pub fn mix(&self) -> Mix {
        Mix {
            read_percent: self.mix_read_percent,
        }
    }

    pub fn mode(&self) -> String {
        match self.rate {
            Some(r) => format!("open {r:.0}/s"),
            None if self.rounds => "rounds".into(),
            None => "closed".into(),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.connections >= 1 && self.connections <= 10_000,
            "connections must be 1..=10000"
        );
        anyhow::ensure!(
            self.in_flight >= 1 && self.in_flight <= 1024,
            "in-flight must be 1..=1024"
        );
        anyhow::ensure!(
            !(self.rounds && self.rate.is_some()),
            "rounds are a closed loop: they take no rate"
        );
        anyhow::ensure!(
            self.batch >= 1 && self.batch <= 1000,
            "batch must be 1..=1000"
        );
        anyhow::ensure!(self.auto_batch <= 1000, "auto-batch must be 0..=1000");
        anyhow::ensure!(
            self.threads >= 1 && self.threads <= 64,
            "threads must be 1..=64"
        );
        anyhow::ensure!(
            self.keys >= self.batch as u64,
            "keys must be at least the batch size"
        );
        anyhow::ensure!(!self.duration.is_zero(), "duration must be > 0");
        anyhow::ensure!(
            !self.idempotent || self.target == TargetKind::Capkv,
            "--idempotent is for the capkv target (its client library makes the keys)"
        );
        if let Some(r) = self.rate {
            anyhow::ensure!(r > 0.0 && r <= 10_000_000.0, "rate must be in (0, 1e7]");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub config: RunConfig,
    pub mode: String,
    /// Seconds measured (the window).
    pub window_secs: f64,
    pub ops: Vec<OpSummary>,
    /// Keys per second over all successful calls (calls/s x batch).
    pub keys_per_sec: f64,
    pub attempts: u64,
    pub retries: u64,
    pub send_lag: Option<Latency>,
    pub server: Option<procstat::Usage>,
    /// This generator's own CPU over the window (every thread of the process): what a call
    /// costs the client, so a row limited by the client says so. Closed loop only.
    pub client: Option<procstat::Usage>,
}

impl RunResult {
    /// The generator's CPU time per successful call over the window, in microseconds.
    pub fn client_cpu_us_per_call(&self) -> Option<f64> {
        per_call_us(self.client?, self.all()?.ok_per_sec)
    }

    /// The server's CPU time per successful call over the window (user + sys from /proc),
    /// in microseconds: what the "server CPU per call" compares between servers.
    pub fn server_cpu_us_per_call(&self) -> Option<f64> {
        per_call_us(self.server?, self.all()?.ok_per_sec)
    }

    /// [`RunResult::server_cpu_us_per_call`] in user space only: the server's own code,
    /// without the kernel's share (mostly loopback TCP, which any server pays).
    pub fn server_user_us_per_call(&self) -> Option<f64> {
        per_call_user_us(self.server?, self.all()?.ok_per_sec)
    }

    pub fn all(&self) -> Option<&OpSummary> {
        self.ops.iter().find(|o| o.op == "all")
    }
}

/// CPU microseconds per call of a process that was `usage` busy at `calls_per_sec`.
pub fn per_call_us(usage: procstat::Usage, calls_per_sec: f64) -> Option<f64> {
    (calls_per_sec > 0.0).then(|| usage.cpu_percent / 100.0 / calls_per_sec * 1e6)
}

/// [`per_call_us`] in user space only.
pub fn per_call_user_us(usage: procstat::Usage, calls_per_sec: f64) -> Option<f64> {
    (calls_per_sec > 0.0).then(|| usage.user_percent / 100.0 / calls_per_sec * 1e6)
}

/// Shared timing of one run, fixed once every connection is open.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

/// Loads every key once (batches of `preload_batch`, a few in flight) so that reads find
/// values.
pub fn preload(cfg: &RunConfig) -> anyhow::Result<()> {
    let batch = cfg.preload_batch.max(1);
    const IN_FLIGHT: u64 = 4;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        // Setup, not measured: a raw target preloads through its client library, which
        // has batches.
        let target = cfg.target.library();
        let conn = Conn::open(target, &cfg.addr, &options(cfg)).await?;
        // Every key gets a value of the generator's pool in turn: consecutive keys differ.
        let mut values = OpGen::new(cfg.seed, cfg.mix(), cfg.keys, cfg.dist, cfg.value_size);
        let pool: Vec<Vec<u8>> = (0..VALUE_POOL).map(|_| values.value().to_vec()).collect();
        let batches: Vec<u64> = (0..cfg.keys.div_ceil(batch)).collect();
        for group in batches.chunks(IN_FLIGHT as usize) {
            let calls = group.iter().map(|b| {
                let items: Vec<(Vec<u8>, &[u8])> = (b * batch..((b + 1) * batch).min(cfg.keys))
                    .map(|i| (key(i), pool[i as usize % pool.len()].as_slice()))
                    .collect();
                let conn = conn.clone();
                async move {
                    conn.put_many(&items, Instant::now() + Duration::from_secs(30))
                        .await
                }
            });
            for r in futures::future::join_all(calls).await {
                r.map_err(|code| anyhow::anyhow!("preload failed: {code}"))?;
            }
        }
        Ok(())
    })
}

fn options(cfg: &RunConfig) -> ClientOptions {
    ClientOptions {
        token: cfg.token.clone(),
        timeout: cfg.timeout,
        auto_batch_keys: cfg.auto_batch,
        rpc_engine: cfg.client_engine,
        idempotent_writes: cfg.idempotent,
        ..ClientOptions::default()
    }
}

/// Runs the load and returns the merged results.
pub fn run(cfg: &RunConfig) -> anyhow::Result<RunResult> {
    cfg.validate()?;
    let threads = cfg.threads.min(cfg.connections);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let window_slot: Arc<std::sync::Mutex<Option<Window>>> = Arc::default();
    let completed = Arc::new(AtomicU64::new(0));
    let failed_to_start = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..threads {
        let cfg = cfg.clone();
        let barrier = Arc::clone(&barrier);
        let window_slot = Arc::clone(&window_slot);
        let completed = Arc::clone(&completed);
        let failed = Arc::clone(&failed_to_start);
        let my_conns: Vec<usize> = (0..cfg.connections).filter(|c| c % threads == t).collect();
        let part = (t, threads);
        handles.push(
            std::thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || {
                    worker(cfg, part, my_conns, barrier, window_slot, completed, failed)
                })?,
        );
    }
    // Every worker has connected (or failed) when the barrier opens the first time.
    barrier.wait();
    if failed_to_start.load(Ordering::Acquire) {
        // Release the workers so they can exit, then report.
        barrier.wait();
        for h in handles {
            let _ = h.join();
        }
        anyhow::bail!(
            "could not open every connection to {} at {}",
            cfg.target.name(),
            cfg.addr
        );
    }
    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + cfg.warmup,
        end: start + cfg.warmup + cfg.duration,
    };
    *window_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(window);
    barrier.wait();

    let (server, client) = monitor(cfg, window, &completed);
    // An open-loop dispatcher keeps its core busy between due times (`wait_until` yields in
    // a loop for sub-millisecond precision): its CPU is the clock's, not the calls'.
    let client = client.filter(|_| cfg.rate.is_none());
    let mut merged = if cfg.rate.is_some() {
        Recorder::for_open_loop()
    } else {
        Recorder::default()
    };
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => merged.merge(&r),
            Ok(Err(e)) => return Err(e),
            Err(_) => anyhow::bail!("a load worker panicked"),
        }
    }
    let ops = summarize(&merged, cfg.duration);
    let ok_calls_per_sec = ops
        .iter()
        .find(|o| o.op == "all")
        .map_or(0.0, |a| a.ok_per_sec);
    Ok(RunResult {
        config: cfg.clone(),
        mode: cfg.mode(),
        window_secs: cfg.duration.as_secs_f64(),
        keys_per_sec: ok_calls_per_sec * cfg.batch as f64,
        attempts: merged.calls,
        retries: merged.retries,
        send_lag: merged.send_lag.as_ref().map(Latency::of),
        ops,
        server,
        client,
    })
}

/// Samples the server and draws progress until the window ends; returns what the server
/// and this process used over the window.
fn monitor(
    cfg: &RunConfig,
    w: Window,
    completed: &AtomicU64,
) -> (Option<procstat::Usage>, Option<procstat::Usage>) {
    let tick = Duration::from_millis(500);
    let wait_until = |t: Instant| std::thread::sleep(t.saturating_duration_since(Instant::now()));
    let own_pid = i32::try_from(std::process::id()).ok();
    wait_until(w.measure_from);
    let first = cfg.server_pid.and_then(procstat::sample);
    let own_first = own_pid.and_then(procstat::sample);
    let mut max_rss = first.map_or(0, |s| s.rss_bytes);
    let mut last_count = completed.load(Ordering::Relaxed);
    let mut last_at = Instant::now();
    while Instant::now() + tick <= w.end {
        wait_until(Instant::now() + tick);
        if let Some(s) = cfg.server_pid.and_then(procstat::sample) {
            max_rss = max_rss.max(s.rss_bytes);
        }
        if cfg.progress {
            let n = completed.load(Ordering::Relaxed);
            let rate = (n - last_count) as f64 / last_at.elapsed().as_secs_f64();
            let left = w.end.saturating_duration_since(Instant::now()).as_secs();
            eprint!(
                "\r{} {}: {:>10.0} calls/s, {:>3} s left   ",
                cfg.target.name(),
                cfg.mode(),
                rate,
                left
            );
            (last_count, last_at) = (n, Instant::now());
        }
    }
    wait_until(w.end);
    if cfg.progress {
        eprintln!();
    }
    let last = cfg.server_pid.and_then(procstat::sample);
    let own_last = own_pid.and_then(procstat::sample);
    let used = |a: Option<procstat::Sample>, b: Option<procstat::Sample>, max_rss| match (a, b) {
        (Some(a), Some(b)) => Some(procstat::usage(&a, &b, max_rss)),
        _ => None,
    };
    (used(first, last, max_rss), used(own_first, own_last, 0))
}

fn worker(
    cfg: RunConfig,
    (part, parts): (usize, usize),
    conns: Vec<usize>,
    barrier: Arc<Barrier>,
    window_slot: Arc<std::sync::Mutex<Option<Window>>>,
    completed: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
) -> anyhow::Result<Recorder> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut opened = Vec::with_capacity(conns.len());
        let mut error = None;
        for c in &conns {
            match Conn::open(cfg.target, &cfg.addr, &options(&cfg)).await {
                Ok(conn) => opened.push((*c, conn)),
                Err(e) => {
                    failed.store(true, Ordering::Release);
                    error = Some(e);
                    break;
                }
            }
        }
        barrier.wait();
        barrier.wait();
        if let Some(e) = error {
            return Err(e);
        }
        let Some(window) = *window_slot.lock().unwrap_or_else(|p| p.into_inner()) else {
            anyhow::bail!("run aborted before it started");
        };
        let recorder = Rc::new(RefCell::new(if cfg.rate.is_some() {
            Recorder::for_open_loop()
        } else {
            Recorder::default()
        }));
        let cfg = Rc::new(cfg);
        let tally = Tally {
            w: window,
            rec: Rc::clone(&recorder),
            completed: Arc::clone(&completed),
        };
        let mut tasks = Vec::new();
        match cfg.rate {
            None if cfg.rounds => {
                for (c, conn) in opened {
                    tasks.push(tokio::task::spawn_local(closed_rounds(
                        Rc::clone(&cfg),
                        conn,
                        cfg.seed ^ ((c as u64) << 20),
                        tally.clone(),
                    )));
                }
            }
            None => {
                for (c, conn) in opened {
                    for slot in 0..cfg.in_flight {
                        let seed = cfg.seed ^ ((c as u64) << 20 | slot as u64);
                        tasks.push(tokio::task::spawn_local(closed_loop(
                            Rc::clone(&cfg),
                            conn.clone(),
                            seed,
                            tally.clone(),
                        )));
                    }
                }
            }
            Some(rate) => {
                // One dispatcher per thread: a single precise clock for its connections.
                let (offset, interval) = open_loop_schedule(rate, parts, part);
                let conns = opened.into_iter().map(|(_, conn)| conn).collect();
                tasks.push(tokio::task::spawn_local(open_loop(
                    Rc::clone(&cfg),
                    conns,
                    cfg.seed ^ ((part as u64) << 20),
                    interval,
                    offset,
                    tally.clone(),
                )));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        let r = recorder.borrow().clone();
        Ok(r)
    })
}

/// Open loop: dispatcher `part` of `parts` (one per worker thread) sends its calls at
/// `offset + i * interval` after the start. Each carries `rate / parts` calls/s, and they
/// are staggered by `1 / rate` so that all calls together are evenly spaced rather than
/// due at the same instant.
pub fn open_loop_schedule(rate: f64, parts: usize, part: usize) -> (Duration, Duration) {
    let offset = Duration::from_secs_f64(part as f64 / rate);
    let interval = Duration::from_secs_f64(parts as f64 / rate);
    (offset, interval)
}

/// How long before a due time the dispatcher stops sleeping and starts yielding: tokio's
/// timer has millisecond ticks and may round a sleep up by one, so a plain sleep would
/// send calls up to ~1 ms late and put that lateness into every latency.
const SPIN_BEFORE_DUE: Duration = Duration::from_micros(1_500);

/// Waits until `t` with sub-millisecond precision: sleeps until shortly before it, then
/// yields (letting replies be processed) until it passes.
async fn wait_until(t: Instant) {
    if let Some(early) = t.checked_sub(SPIN_BEFORE_DUE) {
        if Instant::now() < early {
            tokio::time::sleep_until(early).await;
        }
    }
    while Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

/// Calls a late dispatcher sends in a row before it yields once.
const MAX_LATE_BURST: usize = 32;

/// The open-loop dispatcher's clock. On time, it waits for each call's due time. Behind
/// (the offered rate is above what this thread can send, or a burst of replies held it
/// up), it sends the calls already due at once to catch up, but yields after every
/// [`MAX_LATE_BURST`] of them: never yielding, it would queue the whole rest of the run
/// without letting one reply be read, and a run a little above capacity would report
/// nothing but backlog; yielding after each one, it could send only one call per pass of
/// the scheduler and would fall ever further behind.
#[derive(Default)]
struct Pacer {
    late_in_a_row: usize,
}

impl Pacer {
    async fn until(&mut self, t: Instant) {
        if Instant::now() < t {
            self.late_in_a_row = 0;
            wait_until(t).await;
            return;
        }
        self.late_in_a_row += 1;
        if self.late_in_a_row >= MAX_LATE_BURST {
            self.late_in_a_row = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// The next call: its kind and `batch` distinct keys (a capkv batch refuses repeated keys,
/// and a fair comparison sends Redis the same keys).
fn next_op(gen: &mut OpGen, batch: usize) -> (OpKind, Vec<Vec<u8>>) {
    let kind = gen.kind();
    if batch == 1 {
        return (kind, vec![key(gen.key_index())]);
    }
    let mut picked: Vec<u64> = Vec::with_capacity(batch);
    // Bounded: with keys >= batch (checked in validate) a skewed distribution can still
    // repeat keys; after enough tries, take the next unused index instead.
    for _ in 0..batch * 16 {
        if picked.len() == batch {
            break;
        }
        let k = gen.key_index();
        if !picked.contains(&k) {
            picked.push(k);
        }
    }
    let mut next = 0u64;
    while picked.len() < batch {
        if !picked.contains(&next) {
            picked.push(next);
        }
        next += 1;
    }
    (kind, picked.into_iter().map(key).collect())
}

/// Where a loop's calls are counted: each ended call in `completed` (the progress the
/// monitor watches), and those sent inside the measured window in `rec`.
#[derive(Clone)]
struct Tally {
    w: Window,
    rec: Rc<RefCell<Recorder>>,
    completed: Arc<AtomicU64>,
}

impl Tally {
    /// A call of a closed loop, sent at `sent`, ended at `done`, with its wire latency
    /// if the target measured one.
    fn ended(
        &self,
        kind: OpKind,
        sent: Instant,
        done: Instant,
        (result, wire): (Result<(), &str>, Option<Duration>),
    ) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        if sent >= self.w.measure_from {
            let mut rec = self.rec.borrow_mut();
            rec.record(kind, done - sent, result.err());
            if let (Ok(()), Some(wire)) = (result, wire) {
                rec.record_wire(kind, wire);
            }
        }
    }
}

async fn closed_loop(cfg: Rc<RunConfig>, conn: Conn, seed: u64, tally: Tally) {
    let mut gen = OpGen::new(seed, cfg.mix(), cfg.keys, cfg.dist, cfg.value_size);
    loop {
        let (kind, keys) = next_op(&mut gen, cfg.batch);
        let sent = Instant::now();
        if sent >= tally.w.end {
            break;
        }
        let r = conn
            .call_timed(kind, &keys, gen.value(), sent + cfg.timeout)
            .await;
        tally.ended(kind, sent, Instant::now(), r);
    }
}

/// Rounds: `in_flight` calls sent together (polled in one pass, so the client's writer
/// sends them in one write), the next round when every one has answered.
async fn closed_rounds(cfg: Rc<RunConfig>, conn: Conn, seed: u64, tally: Tally) {
    let mut gen = OpGen::new(seed, cfg.mix(), cfg.keys, cfg.dist, cfg.value_size);
    let mut round = Vec::with_capacity(cfg.in_flight);
    loop {
        let sent = Instant::now();
        if sent >= tally.w.end {
            break;
        }
        round.clear();
        for _ in 0..cfg.in_flight {
            let (kind, keys) = next_op(&mut gen, cfg.batch);
            round.push((kind, keys, gen.value().to_vec()));
        }
        let deadline = sent + cfg.timeout;
        let calls = round.iter().map(|(kind, keys, value)| {
            let conn = &conn;
            async move {
                let r = conn.call_timed(*kind, keys, value, deadline).await;
                (*kind, Instant::now(), r)
            }
        });
        for (kind, done, r) in futures::future::join_all(calls).await {
            tally.ended(kind, sent, done, r);
        }
    }
}

async fn open_loop(
    cfg: Rc<RunConfig>,
    conns: Vec<Conn>,
    seed: u64,
    interval: Duration,
    offset: Duration,
    tally: Tally,
) {
    let Tally { w, rec, completed } = tally;
    let mut gen = OpGen::new(seed, cfg.mix(), cfg.keys, cfg.dist, cfg.value_size);
    let outstanding: Vec<Rc<Cell<usize>>> = conns.iter().map(|_| Rc::default()).collect();
    let mut calls = Vec::new();
    let mut pacer = Pacer::default();
    for i in 0u32.. {
        let intended = w.start + offset + interval * i;
        if intended >= w.end {
            break;
        }
        pacer.until(intended).await;
        // Round robin over this thread's connections.
        let c = i as usize % conns.len();
        let (kind, keys) = next_op(&mut gen, cfg.batch);
        let measured = intended >= w.measure_from;
        if outstanding[c].get() >= cfg.max_outstanding {
            if measured {
                rec.borrow_mut().record_dropped(kind);
            }
            continue;
        }
        let value = gen.value().to_vec();
        let (conn, rec, outstanding, completed) = (
            conns[c].clone(),
            Rc::clone(&rec),
            Rc::clone(&outstanding[c]),
            Arc::clone(&completed),
        );
        let timeout = cfg.timeout;
        outstanding.set(outstanding.get() + 1);
        calls.push(tokio::task::spawn_local(async move {
            let sent = Instant::now();
            let r = conn.call(kind, &keys, &value, sent + timeout).await;
            let done = Instant::now();
            outstanding.set(outstanding.get() - 1);
            completed.fetch_add(1, Ordering::Relaxed);
            if measured {
                let mut rec = rec.borrow_mut();
                rec.record_lag(sent - intended);
                rec.record(kind, done - intended, r.err());
            }
        }));
        // Keep the handle list short: drop finished ones now and then.
        if calls.len() >= 4096 {
            calls.retain(|h| !h.is_finished());
        }
    }
    for h in calls {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_schedule_spreads_the_rate_evenly() {
        let (rate, parts) = (1000.0, 4);
        let mut due: Vec<Duration> = (0..parts)
            .flat_map(|c| {
                let (offset, interval) = open_loop_schedule(rate, parts, c);
                (0..250u32).map(move |i| offset + interval * i)
            })
            .collect();
        due.sort();
        // 1000 calls over one second, 1 ms apart.
        assert_eq!(due.len(), 1000);
        assert!(due.last().unwrap() < &Duration::from_secs(1));
        for w in due.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64();
            assert!((gap - 0.001).abs() < 1e-6, "gap {gap}");
        }
    }

    #[test]
    fn a_late_dispatcher_catches_up_in_bursts_but_lets_replies_in() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let ran = Rc::new(Cell::new(false));
            let flag = Rc::clone(&ran);
            // Stands for a reply waiting to be read while the dispatcher is behind.
            let reply = tokio::task::spawn_local(async move { flag.set(true) });
            let mut pacer = Pacer::default();
            let due = Instant::now();
            for _ in 1..MAX_LATE_BURST {
                pacer.until(due).await;
            }
            assert!(!ran.get(), "calls already due go out at once");
            pacer.until(due).await;
            assert!(ran.get(), "a burst of late calls ends with a yield");
            reply.await.unwrap();
        });
    }

    #[test]
    fn batches_have_distinct_keys_even_when_skewed() {
        let mut gen = OpGen::new(3, Mix::MIXED, 20, KeyDist::Zipf(3.0), 8);
        for _ in 0..100 {
            let (_, keys) = next_op(&mut gen, 16);
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 16);
        }
    }
}
