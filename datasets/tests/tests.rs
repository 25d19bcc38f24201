//! Integration tests of the datasets crate (one binary to save link time).

mod bad_input;
mod buckets;
mod cache;
mod common;
mod emulators;
mod encoders;
mod http;
mod listing;
mod reader;
mod s3;
mod subjects200k;
