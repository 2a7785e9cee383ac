//! A loopback etcd cluster from Debian's `etcd-server` package, for tests and scripts: each
//! member a child process on 127.0.0.1 with its data in a directory it is given, stopped
//! by its PID (SIGKILL, as a crash) and restarted on the same ports and data.
//!
//! Ports: etcd must be told every member's peer address before any of them starts, so a
//! member cannot listen on port 0 and report back; free ports are found by binding port 0
//! and letting go, and a start that loses that race (another process took the port) is
//! tried again on new ports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a member or the cluster may take to answer its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts tried on fresh ports before giving up.
const START_ATTEMPTS: usize = 3;

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
}

struct Member {
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain HTTP `/health` and `/metrics`, whatever the client URLs speak.
    metrics: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
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
        // Hold every listener until all ports are known, so no two members get the same.
        let listeners = (0..size * 3)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<Result<Vec<_>, _>>()?;
        drop(listeners);
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
        Ok(cluster)
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
    pub fn wait_healthy(&self, i: usize) -> Result<(), ClusterError> {
        let m = &self.members[i];
        let deadline = Instant::now() + READY_TIMEOUT;
        // Bounded by the deadline; each probe is a short HTTP exchange.
        while Instant::now() < deadline {
            if health(m.metrics).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ClusterError::NotReady {
            member: i,
            timeout: READY_TIMEOUT,
            log: std::fs::read_to_string(m.dir.with_extension("log")).unwrap_or_default(),
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
    }
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
