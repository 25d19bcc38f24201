//! The CPU backend: a ring over TCP. Rank r sends to r+1 and receives from r-1.
//!
//! All-reduce is the bandwidth-optimal ring: a reduce-scatter (w-1 steps, each rank adds the
//! chunk it receives to its own), after which rank r holds the complete sum of chunk (r+1) mod w,
//! then an all-gather of those chunks (w-1 steps). Each element is summed by one rank in one
//! fixed order and then copied, so every rank ends with identical bits. Sending and receiving
//! run at the same time (a scoped thread sends) so large messages cannot deadlock the ring on
//! full socket buffers.
//!
//! Joining the ring proves knowledge of the job token without sending it: the accepting rank
//! sends a random nonce, the connecting one answers with its rank and an HMAC-SHA256, keyed by
//! the token, over the nonce, both ranks and the run's prefix. A connection that answers wrong
//! (a stranger, a process of another job) is dropped and the rank keeps waiting for its real
//! neighbour. The listening socket is bound to the address this rank reaches the store from,
//! 127.0.0.1 for a single-node job.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rendezvous::StoreClient;

use super::{Collective, DistError, DistResult, ReduceOp};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The HMAC state of what a ring handshake proves: (token, prefix, nonce, from, to).
fn ring_mac(token: &str, prefix: &str, nonce: &[u8; 32], from: usize, to: usize) -> HmacSha256 {
    use hmac::Mac;
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as hmac::digest::KeyInit>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"mosaic ring v1\0");
    mac.update(prefix.as_bytes());
    mac.update(&[0]);
    mac.update(nonce);
    mac.update(&(from as u64).to_le_bytes());
    mac.update(&(to as u64).to_le_bytes());
    mac
}

/// The setup of one ring link, as both ends know it.
struct Handshake<'a> {
    token: &'a str,
    prefix: &'a str,
    timeout: Duration,
}

impl Handshake<'_> {
    /// The connecting side: reads the nonce, answers with `from` and the MAC.
    fn answer(&self, s: &mut TcpStream, from: usize, to: usize) -> DistResult<()> {
        let t = self.timeout;
        s.set_read_timeout(Some(t))
            .map_err(|e| socket("cannot configure the ring socket", e))?;
        let mut nonce = [0u8; 32];
        s.read_exact(&mut nonce)
            .map_err(|e| io_err("ring setup", to, t, e))?;
        use hmac::Mac;
        let mut msg = (from as u64).to_le_bytes().to_vec();
        let mac = ring_mac(self.token, self.prefix, &nonce, from, to).finalize();
        msg.extend_from_slice(&mac.into_bytes());
        s.write_all(&msg)
            .map_err(|e| io_err("ring setup", to, t, e))
    }

    /// The accepting side: whether the peer on `s` is rank `from` of this job.
    fn check(&self, s: &mut TcpStream, from: usize, to: usize) -> std::io::Result<bool> {
        use hmac::Mac;
        s.set_nonblocking(false)?;
        // A stranger that connects and says nothing costs this rank a few seconds at most.
        s.set_read_timeout(Some(self.timeout.min(Duration::from_secs(10))))?;
        let nonce: [u8; 32] = rand::random();
        s.write_all(&nonce)?;
        let mut got = [0u8; 40];
        s.read_exact(&mut got)?;
        let rank = u64::from_le_bytes(got[..8].try_into().unwrap_or([0xff; 8]));
        if rank != from as u64 {
            return Ok(false);
        }
        // verify_slice compares in constant time.
        Ok(ring_mac(self.token, self.prefix, &nonce, from, to)
            .verify_slice(&got[8..])
            .is_ok())
    }
}

pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank - 1.
    prev: Option<TcpStream>,
    timeout: Duration,
}

fn io_err(op: &'static str, peer: usize, timeout: Duration, e: std::io::Error) -> DistError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => DistError::Timeout {
            op,
            peer,
            waited: timeout,
        },
        _ => DistError::Peer {
            op,
            peer,
            source: e,
        },
    }
}

/// A failed socket operation of the ring setup.
fn socket(what: &'static str, source: std::io::Error) -> DistError {
    DistError::Socket { what, source }
}

/// Connects to the next rank at `addr`, retrying until `timeout` after `started`.
fn connect_next(
    next_rank: usize,
    next_addr: SocketAddr,
    started: Instant,
    timeout: Duration,
) -> DistResult<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&next_addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if started.elapsed() < timeout => {
                tracing::debug!(%e, %next_addr, "ring connect retry");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(DistError::Connect {
                    peer: next_rank,
                    addr: next_addr,
                    source: e,
                })
            }
        }
    }
}

/// Accepts the previous rank's connection, until `timeout` after `started`; connections that
/// fail the handshake are dropped and waiting goes on.
fn accept_prev(
    listener: &TcpListener,
    hs: &Handshake,
    (prev_rank, rank): (usize, usize),
    started: Instant,
    timeout: Duration,
) -> DistResult<TcpStream> {
    loop {
        match listener.accept() {
            Ok((mut s, peer)) => match hs.check(&mut s, prev_rank, rank) {
                Ok(true) => return Ok(s),
                Ok(false) | Err(_) => {
                    tracing::warn!(
                        %peer,
                        "refused a ring connection that is not rank {prev_rank} of this job (wrong job token or rank)"
                    );
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(socket("accept failed", e)),
        }
        if started.elapsed() > timeout {
            return Err(DistError::Timeout {
                op: "ring setup",
                peer: prev_rank,
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl TcpRing {
    /// Connects rank `rank` of `world` into the ring, exchanging listening addresses through the
    /// store under `prefix` and proving `token` to each neighbour. `timeout` bounds the setup,
    /// `op_timeout` every later operation.
    pub fn connect(
        store: &mut StoreClient,
        prefix: &str,
        token: &str,
        (rank, world): (usize, usize),
        timeout: Duration,
        op_timeout: Duration,
    ) -> DistResult<Self> {
        if world == 1 {
            return Ok(Self {
                rank,
                world,
                next: None,
                prev: None,
                timeout: op_timeout,
            });
        }
        let rdv = |what: String| DistError::Rendezvous(what);
        // Listen only where this rank reaches the store from (127.0.0.1 on a single node).
        let ip = store.local_ip()?;
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .map_err(|e| socket("cannot open a listening socket", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| socket("cannot read the listening address", e))?
            .port();
        store.set(
            &format!("{prefix}/ring/{rank}"),
            SocketAddr::new(ip, port).to_string().as_bytes(),
        )?;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr =
            String::from_utf8_lossy(&store.get(&format!("{prefix}/ring/{next_rank}"), timeout)?)
                .into_owned();
        let next_addr: SocketAddr = next_addr.parse().map_err(|e| {
            rdv(format!(
                "rank {next_rank} published a bad address {next_addr:?}: {e}"
            ))
        })?;
        let started = Instant::now();
        listener
            .set_nonblocking(true)
            .map_err(|e| socket("cannot configure the listening socket", e))?;
        let hs = Handshake {
            token,
            prefix,
            timeout,
        };
        // Both links at once: each connecting rank waits for its neighbour's nonce, which that
        // neighbour sends from its accepting side.
        let (next, prev) = std::thread::scope(|scope| {
            let accepting =
                scope.spawn(|| accept_prev(&listener, &hs, (prev_rank, rank), started, timeout));
            let next = connect_next(next_rank, next_addr, started, timeout).and_then(|mut s| {
                hs.answer(&mut s, rank, next_rank)?;
                Ok(s)
            });
            let prev = accepting.join().unwrap_or_else(|_| {
                Err(DistError::Rendezvous(
                    "the accepting thread panicked".into(),
                ))
            });
            (next, prev)
        });
        let (next, prev) = (next?, prev?);
        for s in [&next, &prev] {
            let configure = |e| socket("cannot configure the ring socket", e);
            s.set_nodelay(true).map_err(configure)?;
            s.set_write_timeout(Some(op_timeout)).map_err(configure)?;
            s.set_read_timeout(Some(op_timeout)).map_err(configure)?;
        }
        Ok(Self {
            rank,
            world,
            next: Some(next),
            prev: Some(prev),
            timeout: op_timeout,
        })
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Sends `out` to the next rank while reading `len` bytes from the previous one.
    fn exchange(&mut self, op: &'static str, out: &[u8], len: usize) -> DistResult<Vec<u8>> {
        let (next_rank, prev_rank, timeout) = (self.next_rank(), self.prev_rank(), self.timeout);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Err(DistError::Rendezvous("ring is not connected".into()));
        };
        let mut buf = vec![0u8; len];
        std::thread::scope(|s| {
            let sender = s.spawn(move || next.write_all(out));
            let got = prev.read_exact(&mut buf);
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
            got.map_err(|e| io_err(op, prev_rank, timeout, e))?;
            sent.map_err(|e| io_err(op, next_rank, timeout, e))
        })?;
        Ok(buf)
    }

    /// Sends a length-prefixed message while receiving one.
    fn exchange_framed(&mut self, op: &'static str, out: &[u8]) -> DistResult<Vec<u8>> {
        let header = self.exchange(op, &(out.len() as u64).to_le_bytes(), 8)?;
        let len = u64::from_le_bytes(header.try_into().unwrap_or([0; 8])) as usize;
        self.exchange(op, out, len)
    }

    fn ring_all_reduce<E: Elem>(&mut self, data: &mut [E]) -> DistResult<()> {
        let w = self.world;
        let n = data.len();
        let bounds = |c: usize| (c * n / w, (c + 1) * n / w);
        let r = self.rank;
        for s in 0..w - 1 {
            let (send_c, recv_c) = ((r + w - s) % w, (r + 2 * w - s - 1) % w);
            let (a, b) = bounds(send_c);
            let out = E::encode(&data[a..b]);
            let (c, d) = bounds(recv_c);
            let got = self.exchange("all_reduce", &out, (d - c) * E::SIZE)?;
            E::add_from(&mut data[c..d], &got);
        }
        for s in 0..w - 1 {
            let (send_c, recv_c) = ((r + 1 + w - s) % w, (r + w - s) % w);
            let (a, b) = bounds(send_c);
            let out = E::encode(&data[a..b]);
            let (c, d) = bounds(recv_c);
            let got = self.exchange("all_reduce", &out, (d - c) * E::SIZE)?;
            E::copy_from(&mut data[c..d], &got);
        }
        Ok(())
    }
}

/// An element the ring can add and move as little-endian bytes.
trait Elem: Copy + Send + Sync {
    const SIZE: usize;
    fn encode(xs: &[Self]) -> Vec<u8>;
    fn decode(b: &[u8]) -> Vec<Self>;
    /// dst[i] += the i-th element of `b`.
    fn add_from(dst: &mut [Self], b: &[u8]);
    /// dst[i] = the i-th element of `b`.
    fn copy_from(dst: &mut [Self], b: &[u8]);
}

macro_rules! float_elem {
    ($t:ty, $n:expr) => {
        impl Elem for $t {
            const SIZE: usize = $n;
            fn encode(xs: &[Self]) -> Vec<u8> {
                let mut out = Vec::with_capacity(xs.len() * $n);
                for x in xs {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                out
            }
            fn decode(b: &[u8]) -> Vec<Self> {
                let mut out = vec![0.0; b.len() / $n];
                Self::copy_from(&mut out, b);
                out
            }
            fn add_from(dst: &mut [Self], b: &[u8]) {
                for (x, c) in dst.iter_mut().zip(b.chunks_exact($n)) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    *x += <$t>::from_le_bytes(a);
                }
            }
            fn copy_from(dst: &mut [Self], b: &[u8]) {
                for (x, c) in dst.iter_mut().zip(b.chunks_exact($n)) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    *x = <$t>::from_le_bytes(a);
                }
            }
        }
    };
}
float_elem!(f32, 4);
float_elem!(f64, 8);

fn scale<E: Copy>(xs: &mut [E], f: impl Fn(E) -> E) {
    for x in xs {
        *x = f(*x);
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }

    /// Shuts the ring's sockets down, which fails any read or write in progress at once.
    fn abort_handle(&self) -> Option<super::AbortHandle> {
        let socks: Vec<TcpStream> = [&self.next, &self.prev]
            .into_iter()
            .flatten()
            .filter_map(|s| s.try_clone().ok())
            .collect();
        Some(std::sync::Arc::new(move || {
            for s in &socks {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }))
    }

    fn all_reduce(&mut self, t: &Tensor, op: ReduceOp) -> DistResult<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        let shape = t.shape().clone();
        let device = t.device().clone();
        let w = self.world as f64;
        let mean = op == ReduceOp::Mean;
        let out = match t.dtype() {
            DType::F32 => {
                let mut v = t.flatten_all()?.to_vec1::<f32>()?;
                self.ring_all_reduce(&mut v)?;
                if mean {
                    scale(&mut v, |x| x / w as f32);
                }
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            DType::F64 => {
                let mut v = t.flatten_all()?.to_vec1::<f64>()?;
                self.ring_all_reduce(&mut v)?;
                if mean {
                    scale(&mut v, |x| x / w);
                }
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            // bf16 is summed in f32 and rounded once at the end.
            DType::BF16 => {
                let mut v: Vec<f32> = t
                    .flatten_all()?
                    .to_vec1::<bf16>()?
                    .into_iter()
                    .map(f32::from)
                    .collect();
                self.ring_all_reduce(&mut v)?;
                if mean {
                    scale(&mut v, |x| x / w as f32);
                }
                let v: Vec<bf16> = v.into_iter().map(bf16::from_f32).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            other => return Err(DistError::Dtype(other)),
        };
        Ok(out.to_device(&device)?)
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> DistResult<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        // Passed along the ring: after hop k the rank k after the root has it. A leading flag
        // byte tells "no data yet" from an empty tensor.
        let mut have = (self.rank == root).then(|| tensor_bytes(t)).transpose()?;
        for _ in 0..self.world - 1 {
            let out = match &have {
                Some(b) => [&[1u8][..], b].concat(),
                None => vec![0u8],
            };
            let got = self.exchange_framed("broadcast", &out)?;
            if have.is_none() && got.first() == Some(&1) {
                have = Some(got[1..].to_vec());
            }
        }
        let bytes = have.ok_or_else(|| {
            DistError::Rendezvous(format!("broadcast from rank {root} never arrived"))
        })?;
        tensor_from_bytes(&bytes, t)
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> DistResult<Vec<Vec<u8>>> {
        let w = self.world;
        let mut all = vec![Vec::new(); w];
        all[self.rank] = mine.to_vec();
        for s in 0..w.saturating_sub(1) {
            let send_i = (self.rank + w - s) % w;
            let recv_i = (self.rank + 2 * w - s - 1) % w;
            let out = all[send_i].clone();
            all[recv_i] = self.exchange_framed("all_gather", &out)?;
        }
        Ok(all)
    }
}

/// The raw little-endian bytes of a tensor (f32, f64 or bf16).
fn tensor_bytes(t: &Tensor) -> DistResult<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => f32::encode(&flat.to_vec1::<f32>()?),
        DType::F64 => f64::encode(&flat.to_vec1::<f64>()?),
        DType::BF16 => flat
            .to_vec1::<bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => return Err(DistError::Dtype(other)),
    })
}

/// A tensor like `like` (shape, dtype, device) holding `bytes`.
fn tensor_from_bytes(bytes: &[u8], like: &Tensor) -> DistResult<Tensor> {
    let shape = like.shape().clone();
    let want = shape.elem_count() * like.dtype().size_in_bytes();
    if bytes.len() != want {
        return Err(DistError::Mismatch(format!(
            "broadcast of a {shape:?} tensor carried {} bytes, expected {want}",
            bytes.len()
        )));
    }
    let t = match like.dtype() {
        DType::F32 => Tensor::from_vec(f32::decode(bytes), shape, &Device::Cpu)?,
        DType::F64 => Tensor::from_vec(f64::decode(bytes), shape, &Device::Cpu)?,
        DType::BF16 => {
            let v: Vec<bf16> = bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?
        }
        other => return Err(DistError::Dtype(other)),
    };
    Ok(t.to_device(like.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac;
    use rendezvous::StoreServer;

    /// Rank 1's ring port is found by a stranger before rank 0 connects: the stranger claims to
    /// be rank 0 but answers the nonce with a MAC of another token. It is dropped, and the ring
    /// forms with the real rank 0 and reduces correctly.
    #[test]
    fn a_stranger_cannot_join_the_ring() {
        let token = "the-job-token";
        let server = StoreServer::bind("127.0.0.1:0", token).unwrap();
        let addr = server.local_addr().to_string();
        let t = Duration::from_secs(20);
        let ring = |rank: usize, delay: Duration| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let mut store = StoreClient::connect(&addr, token, t).unwrap();
                let mut r = TcpRing::connect(&mut store, "p", token, (rank, 2), t, t).unwrap();
                let x = Tensor::new(&[rank as f32 + 1.0], &Device::Cpu).unwrap();
                r.all_reduce(&x, ReduceOp::Sum)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        };
        let one = ring(1, Duration::ZERO);
        let mut spy = StoreClient::connect(&addr, token, t).unwrap();
        let target: SocketAddr = String::from_utf8(spy.get("p/ring/1", t).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        // Queued before rank 0's connection, so rank 1 meets the stranger first.
        let mut s = TcpStream::connect(target).unwrap();
        let stranger = std::thread::spawn(move || {
            let mut nonce = [0u8; 32];
            s.read_exact(&mut nonce).unwrap();
            let forged = ring_mac("another-token", "p", &nonce, 0, 1)
                .finalize()
                .into_bytes();
            let mut msg = 0u64.to_le_bytes().to_vec();
            msg.extend_from_slice(&forged);
            s.write_all(&msg).unwrap();
            // Dropped: nothing more comes, the connection just ends.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            rest
        });
        std::thread::sleep(Duration::from_millis(200));
        let zero = ring(0, Duration::ZERO);
        assert_eq!(zero.join().unwrap(), vec![3.0]);
        assert_eq!(one.join().unwrap(), vec![3.0]);
        assert!(stranger.join().unwrap().is_empty());
    }
}
