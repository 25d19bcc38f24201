//! Through a real S3 API (moto's server, started by ci/s3.sh): shards round-trip, and a server
//! restart in the middle of an epoch loses and repeats no sample. Without MOSAIC_TEST_S3_URL
//! these say so and pass, unless MOSAIC_REQUIRE_SERVERS=1 (.ci/run), where they fail.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datasets::{Cursor, Location};

use crate::common::*;

fn s3_url(test: &str) -> Option<String> {
    server_url(
        "MOSAIC_TEST_S3_URL",
        "ci/s3.sh",
        &format!("datasets-{test}"),
    )
}

#[test]
fn shards_round_trip_through_s3() {
    let Some(url) = s3_url("roundtrip") else {
        return;
    };
    let remote = Location::parse(&url).unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let local = Location::local(local_dir.path());
    let m_remote = write_synth(&remote, 20, 3);
    let m_local = write_synth(&local, 20, 3);
    assert_eq!(m_remote, m_local, "the same bytes whatever the store");
    for world in [1, 2] {
        for rank in 0..world {
            let mut a = open(&remote, loader_opts(world, rank, 2), Cursor::default());
            let mut b = open(&local, loader_opts(world, rank, 2), Cursor::default());
            let n = a.batches_in_epoch(0) + 2;
            for _ in 0..n {
                let (x, y) = (a.next_batch().unwrap(), b.next_batch().unwrap());
                assert_eq!(x.samples, y.samples);
            }
        }
    }
}

/// A prefix on the test's own server at `port`.
fn remote_at(port: u16) -> Location {
    let endpoint = format!("http://127.0.0.1:{port}");
    let opts = [
        ("aws_endpoint", endpoint.as_str()),
        ("aws_allow_http", "true"),
    ];
    Location::parse_with_options("s3://restart/data", &opts).unwrap()
}

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(bin: &str, port: u16) -> Moto {
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Create the bucket (moto accepts unsigned requests).
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "PUT /restart HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "bucket: {reply}");
        Moto { child, port }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A TCP forwarder standing for the server's address: connections go to whichever moto is
/// current (none while "restarting", so clients see refused or dropped connections).
struct Proxy {
    port: u16,
    backend: Arc<AtomicU16>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend = Arc::new(AtomicU16::new(0));
        let b = backend.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let to = b.load(Ordering::SeqCst);
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    continue; // dropped: the client sees a closed connection and retries
                };
                for (mut from, mut into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, backend }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server goes away in the middle of an epoch and comes back (with the same objects, as a
/// persistent store would) seconds later: the reader waits and retries, and the samples it
/// yields are exactly those of an uninterrupted read.
#[test]
fn a_server_restart_mid_epoch_loses_and_repeats_nothing() {
    if s3_url("restart").is_none() {
        return;
    }
    let Some(bin) = datasets::testing::server_env("MOSAIC_TEST_MOTO_SERVER", "ci/s3.sh") else {
        return;
    };
    let first = Moto::start(&bin, free_port());
    write_synth(&remote_at(first.port), 36, 2);
    let proxy = Proxy::start();
    proxy.backend.store(first.port, Ordering::SeqCst);

    let local_dir = tempfile::tempdir().unwrap();
    let local = Location::local(local_dir.path());
    write_synth(&local, 36, 2);
    let mut reference = open(&local, loader_opts(1, 0, 2), Cursor::default());
    let total = reference.batches_in_epoch(0) + 3;
    let want = read_ids(&mut reference, total);

    let mut lo = loader_opts(1, 0, 2);
    lo.prefetch_batches = 1;
    lo.io_threads = 1;
    let mut reader = open(&remote_at(proxy.port), lo, Cursor::default());
    let mut got = read_ids(&mut reader, 3);
    // Down: the old server is gone and nothing answers at the address.
    proxy.backend.store(free_port(), Ordering::SeqCst);
    first.stop();
    let backend = proxy.backend.clone();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        let second = Moto::start(&bin, free_port());
        write_synth(&remote_at(second.port), 36, 2);
        backend.store(second.port, Ordering::SeqCst);
        second
    });
    let outage = Instant::now();
    got.extend(read_ids(&mut reader, total - 3));
    let second = restarter.join().unwrap();
    assert!(
        outage.elapsed() > Duration::from_secs(2),
        "the reader had everything before the outage; the test tests nothing"
    );
    assert_eq!(got, want);
    second.stop();
}
