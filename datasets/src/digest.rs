//! Content digests: shards, row groups, caches, checkpoints and uploads are named and
//! verified by the lower-case hex sha256 of their bytes.

use sha2::{Digest, Sha256};

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
