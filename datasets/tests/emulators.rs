//! Through the Azure Blob Storage API (the Azurite emulator, started by ci/azure.sh): shards
//! written to az:// read back exactly as from a folder. Without MOSAIC_TEST_AZ_URL this says so
//! and passes, unless MOSAIC_REQUIRE_SERVERS=1 (.ci/run), where it fails. (No GCS emulator that speaks the API object_store uses installs from a package
//! registry: gcp-storage-emulator lacks its uploads, so gs:// is not tested against a server.)

use datasets::Location;

use crate::common::*;

/// Writes shards below `url` and a folder; both read back the same batches.
fn round_trip(url: &str) {
    let remote = Location::parse(url).unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let local = Location::local(local_dir.path());
    let m_remote = write_synth(&remote, 16, 3);
    let m_local = write_synth(&local, 16, 3);
    assert_eq!(m_remote, m_local, "the same bytes whatever the store");
    assert_reads_alike(&remote, &local);
}

#[test]
fn shards_round_trip_through_azure_blob_storage() {
    if let Some(url) = server_url("MOSAIC_TEST_AZ_URL", "ci/azure.sh", "datasets") {
        round_trip(&url);
    }
}
