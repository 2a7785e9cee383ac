//! `--target redis-raw`: Redis's protocol (RESP2) written and read by hand, the twin of
//! [`crate::raw`]: the same [`Pipe`] (outbox, one writer, callers in a slab, wire-latency
//! stamps), so that capkv and Redis are driven by one client shape and timed on one
//! definition, with no client library on either side.
//!
//! A get is `GET key`, a put `SET key value`, each encoded straight into the outbox. Redis
//! answers in order, so the reader pops the oldest outstanding id for every reply; it
//! parses only what a GET or SET answers (a bulk string, a null, a simple string, an
//! error) and reads bulk payloads past without copying them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::pipe::{Pipe, Reply};
use crate::target::ErrorCode;
use crate::workload::OpKind;

/// The read buffer's size: many replies per read.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Largest bulk reply accepted (a value far past any benchmark's); past it the connection
/// ends, as on any reply this client cannot read.
const MAX_BULK_BYTES: usize = 16 << 20;

/// One raw Redis connection.
pub struct RawRedisConn {
    pipe: Rc<Pipe>,
    /// Ids in the order their commands were sent: Redis answers in that order.
    order: RefCell<VecDeque<u32>>,
}

impl RawRedisConn {
    /// Connects (inside a `LocalSet`).
    pub async fn connect(addr: &str) -> anyhow::Result<Rc<RawRedisConn>> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let conn = Rc::new(RawRedisConn {
            pipe: Rc::new(Pipe::new(0)),
            order: RefCell::new(VecDeque::new()),
        });
        conn.pipe.start(w, read_replies(Rc::clone(&conn), r));
        Ok(conn)
    }

    /// One GET or SET of one key; with its wire latency when it was answered.
    pub async fn call(
        &self,
        kind: OpKind,
        keys: &[Vec<u8>],
        value: &[u8],
    ) -> (Result<(), ErrorCode>, Option<Duration>) {
        let message = |out: &mut Vec<u8>, id: u32, key: &[u8]| {
            match kind {
                OpKind::Get => command(out, &[b"GET", key]),
                OpKind::Put => command(out, &[b"SET", key, value]),
            }
            self.order.borrow_mut().push_back(id);
        };
        self.pipe.call(kind, keys, message).await
    }
}

/// A command as a RESP array of bulk strings.
fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One reply parsed from the front of a buffer.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// The reply and the bytes it took.
    Reply(Reply, usize),
    /// Not all there yet.
    Partial,
    /// Not a reply a GET or SET gets.
    Invalid,
}

/// Parses the reply at the front of `buf`: `+...` (SET's OK), `$-1` (a missing key: a
/// success, as in every client), `$n` and n bytes (a value), `-...` (an error).
fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > 64 {
            Parsed::Invalid
        } else {
            Parsed::Partial
        };
    };
    let line = &buf[..end];
    let after = end + 2;
    match line.first() {
        Some(b'+') => Parsed::Reply(Reply::Ok, after),
        Some(b'-') => Parsed::Reply(Reply::Error("redis_error"), after),
        Some(b'$') => {
            let Some(n) = std::str::from_utf8(&line[1..])
                .ok()
                .and_then(|n| n.parse::<i64>().ok())
            else {
                return Parsed::Invalid;
            };
            if n < 0 {
                return Parsed::Reply(Reply::Ok, after);
            }
            let n = n as usize;
            if n > MAX_BULK_BYTES {
                return Parsed::Invalid;
            }
            if buf.len() < after + n + 2 {
                return Parsed::Partial;
            }
            if &buf[after + n..after + n + 2] != b"\r\n" {
                return Parsed::Invalid;
            }
            Parsed::Reply(Reply::Ok, after + n + 2)
        }
        _ => Parsed::Invalid,
    }
}

/// Reads replies until the connection ends; then fails every caller still waiting.
async fn read_replies(conn: Rc<RawRedisConn>, mut r: tokio::net::tcp::OwnedReadHalf) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUFFER_BYTES);
    'reading: loop {
        if buf.capacity() - buf.len() < READ_BUFFER_BYTES / 4 {
            buf.reserve(READ_BUFFER_BYTES);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let read_at = Instant::now();
        let mut at = 0;
        loop {
            match parse(&buf[at..]) {
                Parsed::Reply(reply, took) => {
                    at += took;
                    let Some(id) = conn.order.borrow_mut().pop_front() else {
                        break 'reading;
                    };
                    conn.pipe.answer(id, read_at, |_| reply);
                }
                Parsed::Partial => break,
                Parsed::Invalid => break 'reading,
            }
        }
        buf.drain(..at);
    }
    conn.pipe.fail_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in Redis on a thread: reads RESP arrays, answers GET with a value for even
    /// keys and a null for odd ones, SET with OK; returns the commands it saw.
    fn fake_redis(replies: usize) -> (String, std::thread::JoinHandle<Vec<Vec<Vec<u8>>>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            let mut seen = Vec::new();
            while seen.len() < replies {
                line.clear();
                r.read_line(&mut line).unwrap();
                let n: usize = line.trim_end().strip_prefix('*').unwrap().parse().unwrap();
                let mut args = Vec::new();
                for _ in 0..n {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    let len: usize = line.trim_end().strip_prefix('$').unwrap().parse().unwrap();
                    let mut arg = vec![0; len + 2];
                    r.read_exact(&mut arg).unwrap();
                    arg.truncate(len);
                    args.push(arg);
                }
                let reply: &[u8] = match (args[0].as_slice(), args[1].last()) {
                    (b"GET", Some(k)) if k % 2 == 0 => b"$5\r\nvalue\r\n",
                    (b"GET", _) => b"$-1\r\n",
                    _ => b"+OK\r\n",
                };
                out.write_all(reply).unwrap();
                seen.push(args);
            }
            seen
        });
        (addr, handle)
    }

    #[test]
    fn calls_are_answered_in_order_with_their_wire_time() {
        let (addr, server) = fake_redis(40);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let conn = RawRedisConn::connect(&addr).await.unwrap();
            // Twenty of each in flight at once, so replies arrive several to a read.
            let calls = (0..40u8).map(|i| {
                let conn = Rc::clone(&conn);
                async move {
                    let kind = if i % 2 == 0 { OpKind::Get } else { OpKind::Put };
                    conn.call(kind, &[vec![b'k', i]], b"v").await
                }
            });
            for (result, wire) in futures::future::join_all(calls).await {
                assert_eq!(result, Ok(()));
                assert!(wire.is_some());
            }
            // A batch is not something this client sends.
            let (r, _) = conn.call(OpKind::Get, &[vec![1], vec![2]], b"").await;
            assert_eq!(r, Err("raw_mode_single_keys_only"));
        });
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 40);
        assert_eq!(seen[1], vec![b"SET".to_vec(), vec![b'k', 1], b"v".to_vec()]);
        assert_eq!(seen[2], vec![b"GET".to_vec(), vec![b'k', 2]]);
    }

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, &[b"SET", b"k1", b"v"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$1\r\nv\r\n");
    }

    #[test]
    fn replies_parse_whole_or_not_at_all() {
        let ok = |p: Parsed| match p {
            Parsed::Reply(Reply::Ok, n) => Some(n),
            _ => None,
        };
        assert_eq!(ok(parse(b"+OK\r\n")), Some(5));
        assert_eq!(ok(parse(b"$-1\r\n")), Some(5));
        assert_eq!(ok(parse(b"$3\r\nabc\r\n+OK")), Some(9));
        assert_eq!(parse(b"$3\r\nab"), Parsed::Partial);
        assert_eq!(parse(b"$3\r\nabc\r"), Parsed::Partial);
        assert_eq!(parse(b"+O"), Parsed::Partial);
        assert!(matches!(
            parse(b"-ERR wrong\r\n"),
            Parsed::Reply(Reply::Error("redis_error"), 12)
        ));
        assert_eq!(parse(b"$3\r\nabcd\r\n"), Parsed::Invalid);
        assert_eq!(parse(b"*1\r\n"), Parsed::Invalid);
        assert_eq!(parse(b"$x\r\n"), Parsed::Invalid);
        assert_eq!(parse(&[b'+'; 100]), Parsed::Invalid);
    }
}
