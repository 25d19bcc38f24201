//! Through Azure Blob Storage's API (the Azurite emulator, started by ci/azure.sh): shards
//! written to az:// read back exactly as from a folder. Without MOSAIC_TEST_AZ_URL this says so
//! and passes.

use datasets::{Cursor, Location};

use crate::common::*;

#[test]
fn shards_round_trip_through_azure_blob_storage() {
    let Ok(base) = std::env::var("MOSAIC_TEST_AZ_URL") else {
        eprintln!("not run: MOSAIC_TEST_AZ_URL is not set (ci/azure.sh starts an emulator)");
        return;
    };
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
    assert!(remote.exists("manifest.json").unwrap());
    assert!(!remote.exists("nothing.json").unwrap());
    assert_eq!(remote.get("nothing.json").unwrap(), None);
    for (world, rank) in [(1, 0), (2, 1)] {
        let mut a = open(&remote, loader_opts(world, rank, 2), Cursor::default());
        let mut b = open(&local, loader_opts(world, rank, 2), Cursor::default());
        for _ in 0..a.batches_in_epoch(0) + 1 {
            assert_eq!(
                a.next_batch().unwrap().samples,
                b.next_batch().unwrap().samples
            );
        }
    }
}
