//! The row decoder on arbitrary bytes: a Parquet file is parsed, every row decoded and checked,
//! and every valid row's images decoded and transformed. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = datasets::shard::decode_file_rows(data, true);
});
