//! The rendezvous store: a small key-value server over TCP that node 0 runs, and its client.
//!
//! Ranks and launchers exchange addresses, the NCCL unique id, counters and failure flags
//! through it (design.md §6). Every connection must first present the job token; a wrong token
//! is refused and the connection closed, so a stray process or another job on the same port
//! cannot join.
//!
//! Wire format: each message is a little-endian u32 length and then the body. A request body is
//! an op byte, a u32-length key, a u32-length value and an i64 argument; a reply body is a
//! status byte, a u32-length payload and an i64. Keys and values are opaque bytes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Messages above this size are refused (the store holds small values only).
const MAX_MESSAGE: usize = 16 << 20;
/// The first message, before the token is checked: a hello is a few hundred bytes, so a
/// stranger cannot make the server buffer more than this.
const MAX_HELLO: usize = 4 << 10;
/// Connections that have not said hello yet, at most; more are closed at once.
const MAX_PENDING: usize = 64;
/// Connections in all, at most (every rank and launcher holds one or two).
const MAX_CONNECTIONS: usize = 16_384;
/// A connection must say hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a blocked accept or wait re-checks for shutdown.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot listen on {addr}{hint}")]
    Bind {
        addr: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("could not reach the rendezvous store at {addr} within {waited:?} ({attempts} attempts; last error: {last}); check that node 0's launcher is running and that MASTER_ADDR/--master-addr names it")]
    Unreachable {
        addr: String,
        waited: Duration,
        attempts: u32,
        last: String,
    },
    #[error("the rendezvous store at {addr} refused this process: {reason}")]
    Refused { addr: String, reason: String },
    #[error("timed out after {waited:?} waiting for store key `{key}`{hint}")]
    Timeout {
        key: String,
        waited: Duration,
        hint: String,
    },
    #[error("rendezvous store connection to {addr} failed")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed store message")]
    Protocol(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Hello = 1,
    Set = 2,
    Get = 3,
    Add = 4,
    TryGet = 5,
}

impl Op {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Op::Hello,
            2 => Op::Set,
            3 => Op::Get,
            4 => Op::Add,
            5 => Op::TryGet,
            _ => return None,
        })
    }
}

const OK: u8 = 0;
const MISSING: u8 = 1;
const REFUSED: u8 = 2;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn write_frame(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(body.len() + 4);
    put_bytes(&mut msg, body);
    w.write_all(&msg)?;
    w.flush()
}

fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    read_frame_within(r, MAX_MESSAGE)
}

/// A frame of at most `limit` bytes; a longer one is refused before anything is allocated.
fn read_frame_within(r: &mut impl Read, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("store message of {len} bytes exceeds {limit}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Reads length-prefixed fields out of a message body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> std::io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "truncated store message",
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> std::io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn bytes(&mut self) -> std::io::Result<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().unwrap_or([0; 4])) as usize;
        self.take(n)
    }
    fn i64(&mut self) -> std::io::Result<i64> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
}

fn request(op: Op, key: &[u8], value: &[u8], arg: i64) -> Vec<u8> {
    let mut b = vec![op as u8];
    put_bytes(&mut b, key);
    put_bytes(&mut b, value);
    b.extend_from_slice(&arg.to_le_bytes());
    b
}

fn reply(status: u8, payload: &[u8], arg: i64) -> Vec<u8> {
    let mut b = vec![status];
    put_bytes(&mut b, payload);
    b.extend_from_slice(&arg.to_le_bytes());
    b
}

/// Equal-time comparison, so the token cannot be guessed byte by byte from reply timing.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Default)]
struct State {
    map: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    changed: Condvar,
}

/// The store server. It serves until dropped or [`StoreServer::shutdown`].
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `addr` ("0.0.0.0:29500"; port 0 picks a free one).
    pub fn bind(addr: &str, token: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|source| StoreError::Bind {
            addr: addr.to_string(),
            hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                " (the port is in use, perhaps by another job: pick another port)"
            } else {
                ""
            },
            source,
        })?;
        let local = listener.local_addr().map_err(|source| StoreError::Io {
            addr: addr.to_string(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| StoreError::Io {
                addr: addr.to_string(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let token = token.as_bytes().to_vec();
        let stop2 = stop.clone();
        let accept = std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, state, token, stop2))
            .map_err(|source| StoreError::Io {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Self {
            addr: local,
            stop,
            accept: Some(accept),
        })
    }

    /// The bound address (with the chosen port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counts of open connections, and of those not yet past the hello.
#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    pending: AtomicUsize,
}

/// Decrements a counter when dropped (however the connection's thread ends).
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>, token: Vec<u8>, stop: Arc<AtomicBool>) {
    let counts = Arc::new(Counts::default());
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if counts.open.load(Ordering::SeqCst) >= MAX_CONNECTIONS
                    || counts.pending.load(Ordering::SeqCst) >= MAX_PENDING
                {
                    // Closed unread: a flood of connections costs no thread and no memory.
                    drop(stream);
                    continue;
                }
                counts.open.fetch_add(1, Ordering::SeqCst);
                counts.pending.fetch_add(1, Ordering::SeqCst);
                let (state, token, stop, held) =
                    (state.clone(), token.clone(), stop.clone(), counts.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("store-conn".into())
                        .spawn(move || {
                            let _open = Held(&held.open);
                            let _ = serve(stream, &state, &token, &stop, Held(&held.pending));
                        });
                if spawned.is_err() {
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                    counts.pending.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Serves one connection until it closes or the server stops. `pending` counts it among the
/// connections not yet past the hello until it is dropped.
fn serve(
    mut s: TcpStream,
    state: &State,
    token: &[u8],
    stop: &AtomicBool,
    pending: Held,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    // A client must say hello promptly, in a small frame; idle connections later are fine.
    s.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let hello = read_frame_within(&mut s, MAX_HELLO)?;
    let mut f = Fields(&hello);
    let op = f.u8()?;
    let _key = f.bytes()?;
    let presented = f.bytes()?;
    if Op::from_byte(op) != Some(Op::Hello) || !same_token(presented, token) {
        write_frame(
            &mut s,
            &reply(REFUSED, b"wrong job token (or not a store client)", 0),
        )?;
        return Ok(());
    }
    write_frame(&mut s, &reply(OK, b"", 0))?;
    drop(pending);
    // Blocking reads from here: the thread ends when the client disconnects (or the process
    // exits); a Get in progress also ends when the server stops.
    s.set_read_timeout(None)?;
    loop {
        let body = read_frame(&mut s)?;
        let mut f = Fields(&body);
        let op = Op::from_byte(f.u8()?);
        let key = f.bytes()?.to_vec();
        let value = f.bytes()?.to_vec();
        let arg = f.i64()?;
        let out = match op {
            Some(Op::Set) => {
                lock(&state.map).insert(key, value);
                state.changed.notify_all();
                reply(OK, b"", 0)
            }
            Some(Op::TryGet) => match lock(&state.map).get(&key) {
                Some(v) => reply(OK, v, 0),
                None => reply(MISSING, b"", 0),
            },
            Some(Op::Get) => {
                let deadline = Instant::now() + Duration::from_millis(arg.max(0) as u64);
                let mut map = lock(&state.map);
                loop {
                    if let Some(v) = map.get(&key) {
                        break reply(OK, v, 0);
                    }
                    let now = Instant::now();
                    if now >= deadline || stop.load(Ordering::SeqCst) {
                        break reply(MISSING, b"", 0);
                    }
                    let wait = (deadline - now).min(POLL * 5);
                    map = match state.changed.wait_timeout(map, wait) {
                        Ok((m, _)) => m,
                        Err(p) => p.into_inner().0,
                    };
                }
            }
            Some(Op::Add) => {
                let mut map = lock(&state.map);
                let cur = map
                    .get(&key)
                    .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                    .map(i64::from_le_bytes)
                    .unwrap_or(0);
                let new = cur + arg;
                map.insert(key, new.to_le_bytes().to_vec());
                drop(map);
                state.changed.notify_all();
                reply(OK, b"", new)
            }
            Some(Op::Hello) | None => reply(REFUSED, b"unknown store operation", 0),
        };
        write_frame(&mut s, &out)?;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection to the store.
pub struct StoreClient {
    addr: String,
    stream: TcpStream,
}

impl StoreClient {
    /// Connects to `addr` ("host:port"), retrying with backoff for up to `wait` (node 0 may
    /// start later than this process), then presents `token`.
    pub fn connect(addr: &str, token: &str, wait: Duration) -> Result<Self> {
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut delay = Duration::from_millis(50);
        let stream = loop {
            attempts += 1;
            let err = match addr.to_socket_addrs() {
                Ok(addrs) => {
                    let mut last = String::from("the name resolved to no address");
                    let mut got = None;
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                            Ok(s) => {
                                got = Some(s);
                                break;
                            }
                            Err(e) => last = e.to_string(),
                        }
                    }
                    match got {
                        Some(s) => break s,
                        None => last,
                    }
                }
                Err(e) => format!("cannot resolve: {e}"),
            };
            let waited = started.elapsed();
            if waited + delay > wait {
                return Err(StoreError::Unreachable {
                    addr: addr.to_string(),
                    waited,
                    attempts,
                    last: err,
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        };
        let io = |source| StoreError::Io {
            addr: addr.to_string(),
            source,
        };
        stream.set_nodelay(true).map_err(io)?;
        let mut c = Self {
            addr: addr.to_string(),
            stream,
        };
        let (status, payload, _) = c.call(Op::Hello, b"", token.as_bytes(), 0, None)?;
        if status != OK {
            return Err(StoreError::Refused {
                addr: addr.to_string(),
                reason: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok(c)
    }

    /// The address of this end of the connection: the interface through which this host
    /// reaches node 0, so also an address other ranks can reach it on.
    pub fn local_ip(&self) -> Result<std::net::IpAddr> {
        self.stream
            .local_addr()
            .map(|a| a.ip())
            .map_err(|source| StoreError::Io {
                addr: self.addr.clone(),
                source,
            })
    }

    fn call(
        &mut self,
        op: Op,
        key: &[u8],
        value: &[u8],
        arg: i64,
        wait: Option<Duration>,
    ) -> Result<(u8, Vec<u8>, i64)> {
        let io = |addr: &str, source| StoreError::Io {
            addr: addr.to_string(),
            source,
        };
        // The server answers a Get after at most `wait`; allow for the network on top.
        let timeout = wait.unwrap_or_default() + Duration::from_secs(30);
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| io(&self.addr, e))?;
        write_frame(&mut self.stream, &request(op, key, value, arg))
            .map_err(|e| io(&self.addr, e))?;
        let body = read_frame(&mut self.stream).map_err(|e| io(&self.addr, e))?;
        let mut f = Fields(&body);
        let parsed = (|| -> std::io::Result<_> { Ok((f.u8()?, f.bytes()?.to_vec(), f.i64()?)) })();
        parsed.map_err(StoreError::Protocol)
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.call(Op::Set, key.as_bytes(), value, 0, None)?;
        Ok(())
    }

    /// The value of `key`, waiting up to `wait` for some process to set it.
    pub fn get(&mut self, key: &str, wait: Duration) -> Result<Vec<u8>> {
        let started = Instant::now();
        // Long waits are split so that the server's per-request wait stays bounded.
        loop {
            let left = wait.saturating_sub(started.elapsed());
            let chunk = left.min(Duration::from_secs(10));
            let (status, v, _) = self.call(
                Op::Get,
                key.as_bytes(),
                b"",
                chunk.as_millis() as i64,
                Some(chunk),
            )?;
            if status == OK {
                return Ok(v);
            }
            if started.elapsed() >= wait {
                return Err(StoreError::Timeout {
                    key: key.to_string(),
                    waited: started.elapsed(),
                    hint: String::new(),
                });
            }
        }
    }

    /// The value of `key` if set, without waiting.
    pub fn try_get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let (status, v, _) = self.call(Op::TryGet, key.as_bytes(), b"", 0, None)?;
        Ok((status == OK).then_some(v))
    }

    /// Adds `delta` to the counter `key` (0 when unset) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        Ok(self.call(Op::Add, key.as_bytes(), b"", delta, None)?.2)
    }

    /// Waits until `n` processes have arrived at barrier `name`, up to `wait`.
    pub fn barrier(&mut self, name: &str, n: usize, wait: Duration) -> Result<()> {
        let arrived = self.add(&format!("{name}/count"), 1)?;
        let done = format!("{name}/done");
        if arrived as usize >= n {
            self.set(&done, b"1")?;
        }
        self.get(&done, wait).map_err(|e| match e {
            StoreError::Timeout { key, waited, .. } => {
                let seen = self.add(&format!("{name}/count"), 0).unwrap_or(-1);
                StoreError::Timeout {
                    key,
                    waited,
                    hint: format!(" (barrier: {seen} of {n} processes arrived)"),
                }
            }
            other => other,
        })?;
        Ok(())
    }
}

/// A fresh random job token (128 bits, hex).
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> (StoreServer, String) {
        let s = StoreServer::bind("127.0.0.1:0", "secret").unwrap();
        let addr = s.local_addr().to_string();
        (s, addr)
    }

    #[test]
    fn set_get_add_across_clients() {
        let (_s, addr) = server();
        let mut a = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        let mut b = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        a.set("k", b"v1").unwrap();
        assert_eq!(b.get("k", Duration::from_secs(1)).unwrap(), b"v1");
        assert_eq!(b.try_get("nope").unwrap(), None);
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(b.add("n", 3).unwrap(), 5);
        assert_eq!(a.add("n", 0).unwrap(), 5);
    }

    /// Whether the server closed `s` (EOF or reset) within `within`.
    fn closed(s: &mut TcpStream, within: Duration) -> bool {
        s.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(n) => n == 0,
            // A timeout is not a close; a reset is.
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    #[test]
    fn a_huge_first_frame_is_refused_before_anything_is_allocated() {
        let (_s, addr) = server();
        let mut junk = TcpStream::connect(&addr).unwrap();
        // Claims 1 GiB: the server must not wait for (or allocate) it.
        junk.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
        assert!(closed(&mut junk, Duration::from_secs(2)));
        let mut c = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        c.set("still", b"serving").unwrap();
    }

    #[test]
    fn connections_that_never_say_hello_are_capped() {
        let (_s, addr) = server();
        let idle: Vec<TcpStream> = (0..MAX_PENDING)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // One more is closed at once, unread.
        let mut extra = TcpStream::connect(&addr).unwrap();
        assert!(closed(&mut extra, Duration::from_secs(2)), "the cap holds");
        // Once the idle ones are gone, clients connect again.
        drop(idle);
        std::thread::sleep(Duration::from_millis(300));
        let mut c = StoreClient::connect(&addr, "secret", Duration::from_secs(10)).unwrap();
        c.set("k", b"v").unwrap();
    }

    #[test]
    fn get_waits_for_a_later_set() {
        let (_s, addr) = server();
        let addr2 = addr.clone();
        let h = std::thread::spawn(move || {
            let mut c = StoreClient::connect(&addr2, "secret", Duration::from_secs(5)).unwrap();
            c.get("late", Duration::from_secs(5)).unwrap()
        });
        std::thread::sleep(Duration::from_millis(100));
        let mut c = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        c.set("late", b"here").unwrap();
        assert_eq!(h.join().unwrap(), b"here");
    }

    #[test]
    fn get_times_out_naming_the_key() {
        let (_s, addr) = server();
        let mut c = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        let e = c.get("never", Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains("`never`"), "{e}");
    }

    #[test]
    fn wrong_token_is_refused() {
        let (_s, addr) = server();
        let e = StoreClient::connect(&addr, "guess", Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(matches!(e, StoreError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("wrong job token"), "{e}");
    }

    #[test]
    fn barrier_releases_everyone() {
        let (_s, addr) = server();
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c =
                        StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
                    c.barrier("b", 3, Duration::from_secs(5)).unwrap();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let mut c = StoreClient::connect(&addr, "secret", Duration::from_secs(5)).unwrap();
        let e = c.barrier("b2", 2, Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains("1 of 2"), "{e}");
    }

    #[test]
    fn unreachable_address_fails_after_bounded_wait() {
        // A port that was just free: nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Instant::now();
        let e = StoreClient::connect(
            &format!("127.0.0.1:{port}"),
            "t",
            Duration::from_millis(500),
        )
        .err()
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(matches!(e, StoreError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
    }

    #[test]
    fn port_in_use_is_reported() {
        let (s, _) = server();
        let e = StoreServer::bind(&s.local_addr().to_string(), "x")
            .err()
            .unwrap();
        assert!(e.to_string().contains("in use"), "{e}");
    }
}
