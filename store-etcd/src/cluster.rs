//! A loopback etcd cluster from Debian's `etcd-server` package, for tests and scripts: each
//! member a child process on 127.0.0.1 with its data in a directory it is given, stopped
//! by its PID (SIGKILL, as a crash) and restarted on the same ports and data.
//!
//! Ports: etcd must be told every member's peer address before any of them starts, so a
//! member cannot listen on port 0 and report back; free ports are found by binding port 0
//! and letting go, and a start that loses that race (another process took the port) is
//! tried again on new ports. Within one process (parallel tests) no port is handed to two
//! running clusters ([`TAKEN_PORTS`]): the member that lost its port would die while the
//! other cluster's member answered its health check, leaving a cluster one member short
//! whose requests to that member are refused.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a member or the cluster may take to answer its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts tried on fresh ports before giving up.
const START_ATTEMPTS: usize = 3;
/// Ports bound beyond those wanted before giving up on finding ones not [`TAKEN_PORTS`].
const SPARE_BINDS: usize = 64;

/// The ports of members of this process's running clusters (taken out when a cluster is
/// dropped). A port the kernel hands out again before its member has bound it is skipped.
static TAKEN_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot start etcd (is Debian's etcd-server installed? scripts/setup.sh installs it): {0}"
    )]
    Spawn(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("etcd member {member} did not become healthy within {timeout:?}; its log: {log}")]
    NotReady {
        member: usize,
        timeout: Duration,
        log: String,
    },
    #[error("etcd member {member} exited while starting ({status}); its log: {log}")]
    Exited {
        member: usize,
        status: ExitStatus,
        log: String,
    },
    #[error("etcd member {member} is healthy but does not accept on its client port {addr}")]
    NotListening { member: usize, addr: SocketAddr },
    #[error("no {wanted} free loopback ports found in {binds} binds")]
    NoPorts { wanted: usize, binds: usize },
}

struct Member {
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain HTTP `/health` and `/metrics`, whatever the client URLs speak.
    metrics: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// What the member's process wrote (empty if unreadable), for an error that names it.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

/// A running cluster. Dropping it kills every member it started.
pub struct Cluster {
    members: Vec<Member>,
    initial: String,
    token: String,
    tls: Option<ClusterTls>,
}

/// TLS on the members' client URLs (PEM files): their certificate and key, and the CA
/// whose client certificates they require.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl Cluster {
    /// Starts `size` members with their data under `dir` and waits until each is healthy.
    pub fn start(dir: &Path, size: usize) -> Result<Self, ClusterError> {
        Self::start_with(dir, size, None)
    }

    /// [`start`](Self::start), the client URLs `https://` with `tls` when given.
    pub fn start_with(
        dir: &Path,
        size: usize,
        tls: Option<ClusterTls>,
    ) -> Result<Self, ClusterError> {
        let mut last = None;
        for attempt in 0..START_ATTEMPTS {
            match Self::start_once(&dir.join(format!("attempt-{attempt}")), size, tls.clone()) {
                Ok(c) => return Ok(c),
                Err(e @ ClusterError::Spawn(_)) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClusterError::Io(std::io::Error::other("no attempt"))))
    }

    fn start_once(dir: &Path, size: usize, tls: Option<ClusterTls>) -> Result<Self, ClusterError> {
        let addrs = take_ports(size * 3)?;
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                client: addrs[3 * i],
                peer: addrs[3 * i + 1],
                metrics: addrs[3 * i + 2],
                dir: dir.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("m{i}=http://{}", m.peer))
            .collect::<Vec<_>>()
            .join(",");
        // Made before anything can fail: its drop gives the ports back.
        let mut cluster = Cluster {
            members,
            initial,
            token: format!("capkv-{}", rand::random::<u32>()),
            tls,
        };
        std::fs::create_dir_all(dir)?;
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_healthy(i)?;
        }
        // A member that lost a port to another process may die after the others elected a
        // leader, or another process's etcd may have answered its health check: every one
        // must still run and accept on its client port.
        for i in 0..size {
            cluster.check_running(i)?;
            let addr = cluster.members[i].client;
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .map_err(|_| ClusterError::NotListening { member: i, addr })?;
        }
        Ok(cluster)
    }

    /// An error if member `i`'s process has exited.
    fn check_running(&mut self, i: usize) -> Result<(), ClusterError> {
        let m = &mut self.members[i];
        let Some(child) = m.child.as_mut() else {
            return Ok(());
        };
        match child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(ClusterError::Exited {
                member: i,
                status,
                log: m.log(),
            }),
        }
    }

    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        let m = &mut self.members[i];
        std::fs::create_dir_all(&m.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.dir.with_extension("log"))?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}", m.client);
        let peer = format!("http://{}", m.peer);
        let mut cmd = Command::new("etcd");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(m.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--listen-metrics-urls", &format!("http://{}", m.metrics)])
            // Loopback: elections in a tenth of a second, not a second.
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(ClusterError::Spawn)?;
        m.child = Some(child);
        Ok(())
    }

    /// Waits until member `i` answers `/health` with `"health":"true"` (it has a leader).
    /// An error at once if its process exits meanwhile (a port taken, say).
    pub fn wait_healthy(&mut self, i: usize) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        // Bounded by the deadline; each probe is a short HTTP exchange.
        while Instant::now() < deadline {
            self.check_running(i)?;
            if health(self.members[i].metrics).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let m = &self.members[i];
        Err(ClusterError::NotReady {
            member: i,
            timeout: READY_TIMEOUT,
            log: m.log(),
        })
    }

    /// Every member's client URL (`http://127.0.0.1:port`, `https://` with TLS), in
    /// member order.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://{}", m.client))
            .collect()
    }

    /// The PID of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Kills member `i` with SIGKILL (a crash: no shutdown of its own) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its ports and data, and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(i)
    }

    /// The member that leads now: the one whose `/metrics` says `etcd_server_is_leader 1`.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i].child.is_some()
                && http_get(self.members[i].metrics, "/metrics")
                    .map(|body| body.lines().any(|l| l == "etcd_server_is_leader 1"))
                    .unwrap_or(false)
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let mut taken = TAKEN_PORTS.lock().unwrap_or_else(PoisonError::into_inner);
        for m in &self.members {
            for addr in [m.client, m.peer, m.metrics] {
                taken.remove(&addr.port());
            }
        }
    }
}

/// `count` loopback addresses on ports free now and not taken by this process's clusters,
/// marked taken. Every listener is held until all are chosen, so no two are the same.
fn take_ports(count: usize) -> Result<Vec<SocketAddr>, ClusterError> {
    let mut taken = TAKEN_PORTS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut held = Vec::with_capacity(count);
    let mut chosen = Vec::with_capacity(count);
    let binds = count + SPARE_BINDS;
    for _ in 0..binds {
        if chosen.len() == count {
            break;
        }
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        if !taken.contains(&addr.port()) {
            chosen.push(addr);
        }
        held.push(listener);
    }
    if chosen.len() < count {
        return Err(ClusterError::NoPorts {
            wanted: count,
            binds,
        });
    }
    taken.extend(chosen.iter().map(SocketAddr::port));
    Ok(chosen)
}

fn health(addr: SocketAddr) -> std::io::Result<bool> {
    Ok(http_get(addr, "/health")?.contains("\"health\":\"true\""))
}

/// One HTTP/1.0 GET on loopback, whole body read (bounded by the member's answer and a
/// timeout on each read).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = Vec::new();
    s.take(4 << 20).read_to_end(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(port: u16) -> bool {
        TAKEN_PORTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&port)
    }

    #[test]
    fn ports_are_not_handed_to_two_running_clusters() {
        let first = take_ports(9).expect("ports");
        let second = take_ports(9).expect("ports");
        let mut all: Vec<u16> = first.iter().chain(&second).map(SocketAddr::port).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 18, "two starts share no port");
        assert!(all.iter().all(|&p| taken(p)));
        // A cluster's drop gives its ports back (here one that never started its members).
        let members = first
            .chunks(3)
            .map(|a| Member {
                client: a[0],
                peer: a[1],
                metrics: a[2],
                dir: PathBuf::new(),
                child: None,
            })
            .collect();
        drop(Cluster {
            members,
            initial: String::new(),
            token: String::new(),
            tls: None,
        });
        assert!(first.iter().all(|a| !taken(a.port())));
        assert!(second.iter().all(|a| taken(a.port())));
    }
}
