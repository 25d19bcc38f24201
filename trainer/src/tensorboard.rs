//! TensorBoard event files (`[logging] tensorboard = true`): the step scalars of
//! `metrics.jsonl` and the validation grids, in `RUN/tb/events.out.tfevents.<time>.<host>.<pid>`.
//!
//! The format is TensorFlow's: TFRecord framing (u64 length, masked CRC32C of the length, the
//! bytes, masked CRC32C of the bytes) around `Event` protobuf messages (event.proto,
//! summary.proto), of which only the fields written here are declared, with prost. No crate
//! on crates.io writes them and is maintained (tensorboard-rs pins image 0.23 and protobuf 2),
//! and the fields needed are few.
//!
//! A resumed run starts a new file with a `SessionLog START` event at its first step, which
//! tells TensorBoard to drop the previous file's events from that step on (those an
//! interrupted run wrote after its last checkpoint), so each step appears once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::error::{Result, TrainerError};
use crate::metrics::StepMetrics;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    image: Option<Image>,
}

#[derive(Clone, PartialEq, Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    /// 3: RGB.
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    /// 1: START.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// TFRecord's checksum: CRC32C, rotated right by 15 bits, plus a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: the framing around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The scalars of one step line: (tag, value).
pub fn step_scalars(m: &StepMetrics) -> [(&'static str, f64); 8] {
    [
        ("loss/total", m.loss),
        ("loss/diff", m.loss_diff),
        ("loss/scal", m.loss_scal),
        ("loss/mdl", m.loss_mdl),
        ("train/lr", m.lr),
        ("train/grad_norm", m.grad_norm),
        ("train/s_per_step", m.s_per_step),
        ("train/tokens_per_s", m.tokens_per_s),
    ]
}

/// An open event file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file under `dir` (created); `first_step` > 1 marks a resumed run's start.
    pub fn create(dir: &Path, first_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        let name = format!(
            "events.out.tfevents.{}.{host}.{}",
            now() as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| TrainerError::io(&path, e))?;
        let mut w = Self { file, path };
        w.write(&Event {
            wall_time: now(),
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        if first_step > 1 {
            w.write(&Event {
                wall_time: now(),
                step: first_step as i64,
                session_log: Some(SessionLog { status: 1 }),
                ..Default::default()
            })?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: &Event) -> Result<()> {
        self.file
            .write_all(&record(&e.encode_to_vec()))
            .and_then(|()| self.file.flush())
            .map_err(|err| TrainerError::io(&self.path, err))
    }

    /// Finite scalars at `step` (non-finite ones are left out, as TensorBoard cannot draw
    /// them).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| Value {
                tag: (*tag).into(),
                simple_value: Some(*v as f32),
                image: None,
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary { value }),
            ..Default::default()
        })
    }

    /// A PNG image of `width` x `height` at `step`.
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: Vec<u8>,
        width: u32,
        height: u32,
    ) -> Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary {
                value: vec![Value {
                    tag: tag.into(),
                    simple_value: None,
                    image: Some(Image {
                        height: height as i32,
                        width: width as i32,
                        colorspace: 3,
                        encoded_image_string: png,
                    }),
                }],
            }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_checksum_is_tfrecord_s() {
        // CRC32C("123456789") = 0xe3069283 (the standard check value), then masked.
        let crc = 0xe306_9283u32;
        assert_eq!(crc32c::crc32c(b"123456789"), crc);
        assert_eq!(
            masked_crc(b"123456789"),
            0xc78a_b0e5, // (crc >> 15 | crc << 17) + 0xa282ead8, worked out by hand
        );
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
    }

    #[test]
    fn field_numbers_are_event_proto_s() {
        // session_log is field 7 of tensorflow.Event (6 is the deprecated log_message): the
        // bytes of a START event at step 3 are wall_time (1), step (2), then 7 = {status 1}.
        let e = Event {
            wall_time: 0.0,
            step: 3,
            session_log: Some(SessionLog { status: 1 }),
            ..Default::default()
        };
        assert_eq!(e.encode_to_vec(), vec![0x10, 3, 0x3a, 2, 0x08, 1]);
    }

    #[test]
    fn events_read_back_as_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(tmp.path(), 5).unwrap();
        w.scalars(5, &[("loss/total", 1.5), ("loss/mdl", f64::NAN)])
            .unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // Walk the records and decode each event.
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].session_log.as_ref().map(|s| s.status), Some(1));
        let v = &events[2].summary.as_ref().unwrap().value;
        assert_eq!(v.len(), 1, "the NaN is left out");
        assert_eq!(
            (v[0].tag.as_str(), v[0].simple_value),
            ("loss/total", Some(1.5))
        );
        assert_eq!(events[2].step, 5);
    }
}
