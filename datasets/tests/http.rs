//! http(s):// locations against a real HTTP server: a minimal static file server (GET with
//! byte ranges, HEAD, 404). The shard reader yields exactly what it yields from the folder
//! itself; pretrained encoders load from a URL, and ranks fetching the same model file at once
//! download it once.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use datasets::model_files::ModelFolder;
use datasets::testing::serve_folder as serve;
use datasets::Location;

use crate::common::*;

#[test]
fn shards_stream_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let local = Location::local(&dir.path().join("data"));
    write_synth(&local, 12, 3);
    let (base, _) = serve(dir.path().to_path_buf());
    let http = Location::parse(&format!("{base}/data")).unwrap();
    assert_reads_alike(&http, &local);
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn pretrained_encoders_load_from_a_url() {
    let (base, _) = serve(fixtures());
    let cache = tempfile::tempdir().unwrap();
    let spec = crate::encoders::spec(&format!("{base}/encoders"), None, cache.path());
    let mut enc =
        datasets::encode::load_encoders(&spec, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    crate::encoders::check_against_reference(&mut enc);
}

#[test]
fn ranks_fetching_one_model_file_download_it_once() {
    let (base, gets) = serve(fixtures());
    let cache = tempfile::tempdir().unwrap();
    let url = format!("{base}/encoders");
    let rel = "text_encoder/model.safetensors";
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let folder = ModelFolder::open(&url, cache.path()).unwrap();
                    folder.file(rel).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.iter().all(|p| *p == paths[0]));
    assert_eq!(
        std::fs::read(&paths[0]).unwrap(),
        std::fs::read(fixtures().join("encoders").join(rel)).unwrap()
    );
    assert_eq!(
        gets.lock().unwrap()[&format!("/encoders/{rel}")],
        1,
        "downloaded once"
    );
    let lock = |p: &Path| PathBuf::from(format!("{}.download-lock", p.display()));
    assert!(!lock(&paths[0]).exists());

    // A lock held by a live download: wait while it is held (its process then died without a
    // copy, so the waiter downloads).
    let rel = "tokenizer/vocab.json";
    let folder = ModelFolder::open(&url, cache.path()).unwrap();
    let dest = paths[0].parent().unwrap().parent().unwrap().join(rel);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(lock(&dest), b"").unwrap();
    let waited = std::thread::scope(|s| {
        let waiter = s.spawn(|| folder.file(rel).unwrap());
        std::thread::sleep(Duration::from_millis(600));
        assert!(!waiter.is_finished(), "a held lock is waited for");
        let fetched = gets
            .lock()
            .unwrap()
            .contains_key(&format!("/encoders/{rel}"));
        std::fs::remove_file(lock(&dest)).unwrap();
        (waiter.join().unwrap(), fetched)
    });
    assert_eq!(waited, (dest.clone(), false));
    assert_eq!(gets.lock().unwrap()[&format!("/encoders/{rel}")], 1);

    // A stale lock (its process died): taken over.
    let rel = "tokenizer/merges.txt";
    let dest = dest.parent().unwrap().join("merges.txt");
    let l = std::fs::File::create(lock(&dest)).unwrap();
    l.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(l);
    assert_eq!(folder.file(rel).unwrap(), dest);
    assert_eq!(gets.lock().unwrap()[&format!("/encoders/{rel}")], 1);
    assert!(!lock(&dest).exists());
}

#[test]
fn a_model_file_replaced_by_one_of_the_same_size_is_downloaded_again() {
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("w.bin"), b"old weights").unwrap();
    let (base, gets) = serve(served.path().to_path_buf());
    let cache = tempfile::tempdir().unwrap();
    let folder = ModelFolder::open(&base, cache.path()).unwrap();
    let got = folder.file("w.bin").unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), b"old weights");
    assert_eq!(folder.file("w.bin").unwrap(), got);
    assert_eq!(
        gets.lock().unwrap()["/w.bin"],
        1,
        "an unchanged object is reused"
    );
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(served.path().join("w.bin"), b"new weights").unwrap();
    assert_eq!(
        std::fs::read(folder.file("w.bin").unwrap()).unwrap(),
        b"new weights"
    );
    assert_eq!(gets.lock().unwrap()["/w.bin"], 2);
}
