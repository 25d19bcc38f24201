//! Checks on Parquet metadata before the parquet crate reads by it: the crate asserts (panics)
//! on some impossible values, so files that carry them are refused here with an error.

use crate::error::BoxError;

/// Refuses metadata whose column chunks start before the file, have a negative size or end past
/// it. The parquet crate asserts on such values (a panic, found by fuzzing), so they must not
/// reach it.
pub fn check_metadata(
    meta: &parquet::file::metadata::ParquetMetaData,
    file_len: u64,
) -> std::result::Result<(), BoxError> {
    for (g, rg) in meta.row_groups().iter().enumerate() {
        for (c, col) in rg.columns().iter().enumerate() {
            let start = col
                .dictionary_page_offset()
                .unwrap_or(col.data_page_offset());
            let len = col.compressed_size();
            let fits = start >= 0
                && len >= 0
                && col.data_page_offset() >= 0
                && (start as u64)
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= file_len);
            if !fits {
                return Err(format!(
                    "row group {g} column {c}: chunk at {start} of {len} bytes does not fit a file of {file_len} bytes"
                ).into());
            }
        }
    }
    Ok(())
}
