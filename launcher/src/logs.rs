//! Rank output: every line a rank writes is printed with a `[rank N]` prefix on the launcher's
//! stdout or stderr (matching the stream it came on), and the last lines are kept so a failure
//! report can show them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The last lines of one rank's output.
pub struct Tail {
    cap: usize,
    lines: Mutex<VecDeque<String>>,
}

impl Tail {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            lines: Mutex::new(VecDeque::with_capacity(cap)),
        })
    }

    fn push(&self, line: String) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == self.cap {
            l.pop_front();
        }
        l.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Which of the launcher's streams a rank's stream goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Copies `from` line by line with `prefix` until it closes. Carriage returns (progress bars)
/// end a line too, so a prefix never lands in the middle of one.
pub fn pump(
    from: impl Read + Send + 'static,
    prefix: String,
    to: Stream,
    tail: Arc<Tail>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("log {prefix}"))
        .spawn(move || {
            let mut r = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match read_line(&mut r, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    continue;
                }
                let _ = match to {
                    Stream::Stdout => writeln!(std::io::stdout().lock(), "{prefix} {line}"),
                    Stream::Stderr => writeln!(std::io::stderr().lock(), "{prefix} {line}"),
                };
                tail.push(line.to_string());
            }
        })
}

/// Reads up to and including the next '\n' or '\r'.
fn read_line(r: &mut impl BufRead, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut n = 0;
    loop {
        let (done, used) = {
            let avail = r.fill_buf()?;
            if avail.is_empty() {
                return Ok(n);
            }
            match avail.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    out.extend_from_slice(&avail[..=i]);
                    (true, i + 1)
                }
                None => {
                    out.extend_from_slice(avail);
                    (false, avail.len())
                }
            }
        };
        r.consume(used);
        n += used;
        if done {
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_on_newline_and_carriage_return_and_tail_is_bounded() {
        let text = b"one\ntwo\rthree\n\nfour".to_vec();
        let tail = Tail::new(3);
        pump(
            std::io::Cursor::new(text),
            "[t]".into(),
            Stream::Stdout,
            tail.clone(),
        )
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(tail.lines(), ["two", "three", "four"]);
    }
}
