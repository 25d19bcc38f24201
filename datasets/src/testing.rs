//! For tests that need a server (the S3 and Azure emulators `.ci/run` starts): the server's URL
//! from its environment variable, or a decision about its absence. Locally a missing server
//! means the test says it did not run and passes; with `MOSAIC_REQUIRE_SERVERS=1` (set by
//! `.ci/run`) a missing server fails the test, so a CI run that lost its emulator is red.
//! And a minimal static HTTP file server of the tests' own ([`serve_folder`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The variable that turns a missing test server into a failure.
pub const REQUIRE_SERVERS: &str = "MOSAIC_REQUIRE_SERVERS";

/// Whether missing test servers must fail the tests.
pub fn servers_required() -> bool {
    std::env::var(REQUIRE_SERVERS).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The value of `var` (exported by the ci/ script `script`, which starts the server). Without
/// it: None after saying the test did not run, or a panic when servers are required.
pub fn server_env(var: &str, script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if servers_required() => panic!(
            "{var} is not set but {REQUIRE_SERVERS} is: the test server ({script}) is missing"
        ),
        _ => {
            eprintln!("not run: {var} is not set ({script} starts a test server)");
            None
        }
    }
}

/// GET requests served, by path.
pub type Gets = Arc<Mutex<HashMap<String, usize>>>;

/// Serves `root` on 127.0.0.1 (one thread per connection, `Connection: close`); returns the
/// base URL and the GET counts.
pub fn serve_folder(root: PathBuf) -> (String, Gets) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let gets: Gets = Default::default();
    let counts = gets.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (root, counts) = (root.clone(), counts.clone());
            std::thread::spawn(move || {
                let _ = answer(stream, &root, &counts);
            });
        }
    });
    (format!("http://127.0.0.1:{port}"), gets)
}

fn answer(mut stream: TcpStream, root: &Path, gets: &Gets) -> std::io::Result<()> {
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
    if method == "GET" {
        *gets.lock().unwrap().entry(path.to_string()).or_default() += 1;
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
    // The ETag follows the file's modification time, as a server's follows its content.
    let mtime = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}ETag: \"{total}-{mtime}\"\r\nLast-Modified: Wed, 25 Nov 2026 00:00:00 GMT\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_is_skipped_or_fails_as_required() {
        // One test owns the variables it changes (tests run on threads of one process).
        std::env::remove_var("MOSAIC_TEST_NO_SUCH_SERVER");
        std::env::remove_var(REQUIRE_SERVERS);
        assert_eq!(server_env("MOSAIC_TEST_NO_SUCH_SERVER", "ci/x.sh"), None);
        std::env::set_var(REQUIRE_SERVERS, "1");
        let r = std::panic::catch_unwind(|| server_env("MOSAIC_TEST_NO_SUCH_SERVER", "ci/x.sh"));
        std::env::remove_var(REQUIRE_SERVERS);
        let msg = r.expect_err("must panic when servers are required");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("MOSAIC_TEST_NO_SUCH_SERVER") && msg.contains("ci/x.sh"),
            "{msg}"
        );
        std::env::set_var("MOSAIC_TEST_NO_SUCH_SERVER", "s3://b/p");
        assert_eq!(
            server_env("MOSAIC_TEST_NO_SUCH_SERVER", "ci/x.sh").as_deref(),
            Some("s3://b/p")
        );
        std::env::remove_var("MOSAIC_TEST_NO_SUCH_SERVER");
    }
}
