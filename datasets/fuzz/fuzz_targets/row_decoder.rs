//! The row decoder on arbitrary bytes: a Parquet file is parsed, every row decoded and checked,
//! and every valid row's images decoded and transformed. Nothing in this crate may panic.
//!
//! libfuzzer-sys makes every panic abort, even one caught on purpose: the parquet crate's own
//! panics on hostile metadata, which `decode_file_rows` turns into errors. The default hook is
//! put back so those stay caught; a panic in this crate's code still reaches the harness, which
//! aborts on it.
#![no_main]

use libfuzzer_sys::fuzz_target;

static HOOK: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    HOOK.call_once(|| {
        let _ = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
    });
    let _ = datasets::shard::decode_file_rows(data, true);
});
