//! `kv-loadgen watch-fanout`: one writer, many watchers of the prefix it writes to.
//!
//! The writer puts as fast as one call at a time allows, each value carrying the moment
//! its put was sent (nanoseconds on this process's clock); every watcher pulls pages
//! (`Watcher.next`, waiting for changes) and records, per event delivered, the time from
//! that put being sent to the event arriving. Reported: puts/s, events delivered/s
//! (summed over watchers: with W watchers each put is W deliveries), and the
//! delivery-latency percentiles.
//!
//! The watchers share a few connections (`--connections`) on one thread with a `LocalSet`,
//! as kv-loadgen's other runs do; the writer has its own thread and connection, so that
//! the watchers' work does not pace it. Bounded: `--duration`, then every task stops.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_client::{ClientOptions, LocalClient, ScanBounds};
use hdrhistogram::Histogram;

/// What one fan-out run is.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    pub addr: String,
    pub watchers: usize,
    pub connections: usize,
    pub duration: Duration,
    pub value_size: usize,
}

/// What one fan-out run measured.
#[derive(Debug)]
pub struct FanoutResult {
    pub puts_per_s: f64,
    pub events_per_s: f64,
    /// Put sent to event delivered, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Events a watcher missed or saw twice (must be 0: every watcher sees every put once).
    pub anomalies: u64,
}

/// Events asked per page, and how long a page waits for one.
const PAGE_EVENTS: u32 = 1_000;
const PAGE_WAIT: Duration = Duration::from_millis(500);
const PREFIX: &[u8] = b"fanout/";

pub fn run(cfg: &FanoutConfig) -> anyhow::Result<FanoutResult> {
    anyhow::ensure!(
        cfg.watchers > 0 && cfg.connections > 0,
        "watchers and connections > 0"
    );
    anyhow::ensure!(
        cfg.value_size >= 8,
        "values carry an 8-byte timestamp: --value-size >= 8"
    );
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let options = ClientOptions {
        timeout: PAGE_WAIT + Duration::from_secs(10),
        ..ClientOptions::default()
    };
    // The writer waits until the watchers are watching (`ready`), so every put counts.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let (cfg, stop, puts, options) = (cfg.clone(), stop.clone(), puts.clone(), options.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            local(async move {
                let c = LocalClient::connect(&cfg.addr, &options).await?;
                ready_rx.recv()?;
                let mut value = vec![b'v'; cfg.value_size];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sent = epoch.elapsed().as_nanos() as u64;
                    value[..8].copy_from_slice(&sent.to_be_bytes());
                    let key = [PREFIX, &(i % 1_000).to_be_bytes()].concat();
                    let deadline = tokio::time::Instant::now() + options.timeout;
                    c.put(&key, &value, capkv_client::Condition::None, deadline)
                        .await?;
                    puts.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            })
        })
    };
    let started = Rc::new(Cell::new(None::<Instant>));
    let result = local(async {
        let mut conns = Vec::new();
        for _ in 0..cfg.connections {
            conns.push(Rc::new(LocalClient::connect(&cfg.addr, &options).await?));
        }
        let hist = Rc::new(RefCell::new(Histogram::<u64>::new(3)?));
        let delivered = Rc::new(Cell::new(0u64));
        let anomalies = Rc::new(Cell::new(0u64));
        let bounds = ScanBounds::Prefix(PREFIX.to_vec());
        // Every watcher first reads to the head (from the next write on), then the writer
        // starts.
        let mut tasks = Vec::new();
        let mut froms = Vec::new();
        for w in 0..cfg.watchers {
            let c = &conns[w % conns.len()];
            let deadline = tokio::time::Instant::now() + options.timeout;
            let page = c
                .watch_next(w as u64, &bounds, 0, (PAGE_EVENTS, 0), deadline)
                .await?;
            froms.push(page.revision + 1);
        }
        ready_tx.send(())?;
        started.set(Some(Instant::now()));
        for (w, from) in froms.into_iter().enumerate() {
            let c = Rc::clone(&conns[w % conns.len()]);
            let (hist, delivered, anomalies, stop, bounds) = (
                hist.clone(),
                delivered.clone(),
                anomalies.clone(),
                stop.clone(),
                bounds.clone(),
            );
            tasks.push(tokio::task::spawn_local(async move {
                let mut from = from;
                while !stop.load(Ordering::Relaxed) {
                    let deadline =
                        tokio::time::Instant::now() + PAGE_WAIT + Duration::from_secs(10);
                    let Ok(page) = c
                        .watch_next(
                            w as u64,
                            &bounds,
                            from,
                            (PAGE_EVENTS, PAGE_WAIT.as_millis() as u32),
                            deadline,
                        )
                        .await
                    else {
                        anomalies.set(anomalies.get() + 1);
                        return;
                    };
                    let now = epoch.elapsed().as_nanos() as u64;
                    let mut h = hist.borrow_mut();
                    for e in &page.events {
                        // Revisions follow one another: one writer, one key per put.
                        if e.entry.mod_revision != from {
                            anomalies.set(anomalies.get() + 1);
                        }
                        from = e.entry.mod_revision + 1;
                        let sent = e
                            .entry
                            .value
                            .get(..8)
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                            .map_or(now, u64::from_be_bytes);
                        let _ = h.record(now.saturating_sub(sent) / 1_000);
                    }
                    delivered.set(delivered.get() + page.events.len() as u64);
                    from = from.max(page.revision + 1);
                }
            }));
        }
        tokio::time::sleep(cfg.duration).await;
        stop.store(true, Ordering::Relaxed);
        let elapsed = started.get().map_or(cfg.duration, |t| t.elapsed());
        let delivered_now = delivered.get();
        for t in tasks {
            let _ = t.await;
        }
        let hist = hist.borrow().clone();
        anyhow::Ok((delivered_now, elapsed, hist, anomalies.get()))
    })?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    let (delivered, elapsed, latency_us, anomalies) = result;
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(FanoutResult {
        puts_per_s: puts.load(Ordering::Relaxed) as f64 / secs,
        events_per_s: delivered as f64 / secs,
        latency_us,
        anomalies,
    })
}

/// Runs `f` to its end on a current-thread runtime inside a `LocalSet`.
fn local<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// The run as text: rates, latency percentiles and anomalies.
pub fn report(cfg: &FanoutConfig, r: &FanoutResult) -> String {
    let q = |p: f64| r.latency_us.value_at_quantile(p) as f64 / 1_000.0;
    format!(
        "watch fan-out: {} watchers on {} connections, 1 writer, {} B values, {:?}\n\
         puts/s {:.0}  events delivered/s {:.0}  put-to-delivery ms p50 {:.2} p99 {:.2} max {:.2}  \
         anomalies {}\n",
        cfg.watchers,
        cfg.connections,
        cfg.value_size,
        cfg.duration,
        r.puts_per_s,
        r.events_per_s,
        q(0.5),
        q(0.99),
        r.latency_us.max() as f64 / 1_000.0,
        r.anomalies,
    )
}
