//! The http(s):// reader against a real HTTP server: a minimal static file server (GET with
//! byte ranges, HEAD, 404) serving a dataset folder; the reader yields exactly what it yields
//! from the folder itself.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use datasets::{Cursor, Location};

use crate::common::*;

/// Serves `root` on 127.0.0.1 (one thread per connection, `Connection: close`); returns the
/// base URL.
fn serve(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &root);
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

fn answer(mut stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").and_then(|r| {
                    let (a, b) = r.split_once('-')?;
                    Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
                });
            }
        }
    }
    let file = root.join(path.trim_start_matches('/'));
    let Ok(bytes) =
        std::fs::read(&file).map_err(|_| ()).and_then(
            |b| {
                if file.is_file() {
                    Ok(b)
                } else {
                    Err(())
                }
            },
        )
    else {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let total = bytes.len() as u64;
    let (status, body, extra) = match range {
        Some((a, b)) if a <= b && b < total => (
            "206 Partial Content",
            &bytes[a as usize..=b as usize],
            format!("Content-Range: bytes {a}-{b}/{total}\r\n"),
        ),
        _ => ("200 OK", &bytes[..], String::new()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Last-Modified: Wed, 25 Nov 2026 00:00:00 GMT\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[test]
fn shards_stream_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let local = Location::local(&dir.path().join("data"));
    write_synth(&local, 12, 3);
    let base = serve(dir.path().to_path_buf());
    let http = Location::parse(&format!("{base}/data")).unwrap();
    assert!(http.exists("manifest.json").unwrap());
    assert!(!http.exists("nothing.json").unwrap());
    assert_eq!(http.get("nothing.json").unwrap(), None);
    for (world, rank) in [(1, 0), (2, 1)] {
        let mut a = open(&http, loader_opts(world, rank, 2), Cursor::default());
        let mut b = open(&local, loader_opts(world, rank, 2), Cursor::default());
        for _ in 0..a.batches_in_epoch(0) + 1 {
            assert_eq!(
                a.next_batch().unwrap().samples,
                b.next_batch().unwrap().samples
            );
        }
    }
}
