//! `kv-loadgen lease-churn`: leases granted, used and left to expire, as fast as the
//! server takes them.
//!
//! `--connections` connections, each with `--in-flight` tasks; every task loops: grant a
//! lease of `--ttl`, put one key with it (its own key each time), and never keep it alive.
//! Reported: cycles (grant + attach) per second, and, after the run and one TTL plus a
//! second, how many of the keys are still there (the reaper must have taken them all: any
//! left is an expiry that did not happen).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capkv_client::{ClientOptions, Condition, KeyLease, LocalClient, ScanBounds, ScanOptions};

#[derive(Debug, Clone)]
pub struct ChurnConfig {
    pub addr: String,
    pub connections: usize,
    pub in_flight: usize,
    pub ttl: Duration,
    pub duration: Duration,
}

#[derive(Debug)]
pub struct ChurnResult {
    pub cycles_per_s: f64,
    /// Keys still there one TTL and a second after the last grant.
    pub left: usize,
}

const PREFIX: &[u8] = b"churn/";

pub fn run(cfg: &ChurnConfig) -> anyhow::Result<ChurnResult> {
    anyhow::ensure!(
        cfg.connections > 0 && cfg.in_flight > 0,
        "connections and in-flight > 0"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&rt, async {
        let options = ClientOptions::default();
        let mut conns = Vec::new();
        for _ in 0..cfg.connections {
            conns.push(Rc::new(LocalClient::connect(&cfg.addr, &options).await?));
        }
        let cycles = Rc::new(Cell::new(0u64));
        let until = Instant::now() + cfg.duration;
        let ttl_ms = cfg.ttl.as_millis() as u64;
        let mut tasks = Vec::new();
        let slots = (0..cfg.in_flight).flat_map(|_| conns.iter());
        for (task, c) in slots.enumerate() {
            let (c, cycles) = (Rc::clone(c), Rc::clone(&cycles));
            tasks.push(tokio::task::spawn_local(async move {
                let mut i = 0u64;
                while Instant::now() < until {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    let lease = c.grant_lease(ttl_ms, deadline).await?;
                    let key = format!("churn/{task}/{i}").into_bytes();
                    c.put_with_lease(
                        &key,
                        b"v",
                        Condition::None,
                        KeyLease::Lease(lease.id),
                        deadline,
                    )
                    .await?;
                    cycles.set(cycles.get() + 1);
                    i += 1;
                }
                anyhow::Ok(())
            }));
        }
        let started = Instant::now();
        for t in tasks {
            t.await??;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        tokio::time::sleep(cfg.ttl + Duration::from_secs(1)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let page = conns[0]
            .scan(
                &ScanOptions {
                    bounds: ScanBounds::Prefix(PREFIX.to_vec()),
                    limit: 10_000,
                    keys_only: true,
                    ..ScanOptions::default()
                },
                deadline,
            )
            .await?;
        Ok(ChurnResult {
            cycles_per_s: cycles.get() as f64 / secs,
            left: page.entries.len(),
        })
    })
}

pub fn report(cfg: &ChurnConfig, r: &ChurnResult) -> String {
    format!(
        "lease churn: {} connections x {} in flight, TTL {:?}, {:?}\n\
         grant + attach cycles/s {:.0}  keys left one TTL + 1 s later {}\n",
        cfg.connections, cfg.in_flight, cfg.ttl, cfg.duration, r.cycles_per_s, r.left
    )
}
