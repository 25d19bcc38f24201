//! Through the Azure Blob Storage API (the Azurite emulator, started by ci/azure.sh): shards
//! written to az:// read back exactly as from a folder. Without MOSAIC_TEST_AZ_URL this says so
//! and passes. (No GCS emulator that speaks the API object_store uses installs from a package
//! registry: gcp-storage-emulator lacks its uploads, so gs:// is not tested against a server.)

use datasets::Location;

use crate::common::*;

/// Writes shards below `base` (a URL) and a folder; both read back the same batches.
fn round_trip(base: &str) {
    let url = format!(
        "{}/datasets-{}",
        base.trim_end_matches('/'),
        std::process::id()
    );
    let remote = Location::parse(&url).unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let local = Location::local(local_dir.path());
    let m_remote = write_synth(&remote, 16, 3);
    let m_local = write_synth(&local, 16, 3);
    assert_eq!(m_remote, m_local, "the same bytes whatever the store");
    assert_reads_alike(&remote, &local);
}

fn url_from(var: &str, script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) => Some(u),
        Err(_) => {
            eprintln!("not run: {var} is not set ({script} starts an emulator)");
            None
        }
    }
}

#[test]
fn shards_round_trip_through_azure_blob_storage() {
    if let Some(base) = url_from("MOSAIC_TEST_AZ_URL", "ci/azure.sh") {
        round_trip(&base);
    }
}
