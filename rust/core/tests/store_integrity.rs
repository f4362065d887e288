//! Store integrity on open: the index version, the header's tensor-table checksum, and the
//! directory lock that keeps a store to one open ExpertStore.
mod common;
use common::{content, schema};
use gmtier_core::store::format::{DATA_FILE, INDEX_FILE};
use gmtier_core::store::{ExpertStore, StoreError, StoreOptions, LOCK_FILE};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn opts(ram_bytes: usize) -> StoreOptions {
    StoreOptions {
        ram_bytes,
        io_threads: 2,
        queue_depth: 4,
        direct: true,
        chunk_bytes: 8192,
        turn_bytes: 0,
    }
}

/// A 1 x 3 store with known records; returns the record size.
fn make(dir: &Path) -> usize {
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    ExpertStore::create(dir, 1, 3, &schema(), None, Some(&mut init)).unwrap();
    let s = ExpertStore::open(dir, opts(1 << 20)).unwrap();
    s.layout().record_bytes
}

fn open_err(dir: &Path) -> String {
    match ExpertStore::open(dir, opts(1 << 20)) {
        Ok(_) => panic!("open of {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The header's JSON text (without the 8-byte length).
fn header(dir: &Path) -> (std::fs::File, Vec<u8>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(DATA_FILE))
        .unwrap();
    let mut len = [0u8; 8];
    f.read_exact_at(&mut len, 0).unwrap();
    let mut json = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact_at(&mut json, 8).unwrap();
    (f, json)
}

#[test]
fn an_unknown_index_version_is_refused_naming_file_and_versions() {
    let d = tempfile::tempdir().unwrap();
    make(d.path());
    let path = d.path().join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(index["version"], 2);
    index["version"] = 7.into();
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    let msg = open_err(d.path());
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("index version 7"), "{msg}");
    assert!(msg.contains("reads index version 1, 2"), "{msg}");
    assert!(matches!(
        ExpertStore::open(d.path(), opts(1 << 20)),
        Err(StoreError::Corrupt(_))
    ));
}

#[test]
fn the_tensor_table_checksum_is_written_and_checked() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path());
    let (f, json) = header(d.path());
    let text = String::from_utf8(json.clone()).unwrap();
    assert!(
        text.contains("\"tensor_table_crc32\""),
        "the header records it"
    );
    // Change one data offset in the table (still valid JSON, same length): refused.
    let entry = "\"slots.4.w1\"";
    let at = text.find(entry).unwrap();
    let digit = at + text[at..].find("data_offsets\":[").unwrap() + "data_offsets\":[".len();
    let mut bad = json.clone();
    bad[digit] = if bad[digit] == b'1' { b'2' } else { b'1' };
    f.write_all_at(&bad, 8).unwrap();
    let msg = open_err(d.path());
    assert!(msg.contains(DATA_FILE), "{msg}");
    assert!(
        msg.contains("tensor table's checksum does not match"),
        "{msg}"
    );
    // Restored: opens and reads as before.
    f.write_all_at(&json, 8).unwrap();
    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    assert_eq!(s.read_record(0, 2).unwrap(), content(0, 2, 0, rb));
}

#[test]
fn a_header_without_the_table_checksum_still_opens() {
    // As an earlier gmtier wrote it: the same header without the key (blanked to spaces, so
    // the JSON stays valid and the data start stays put).
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path());
    let (f, json) = header(d.path());
    let text = String::from_utf8(json).unwrap();
    let start = text.find("\"tensor_table_crc32\"").unwrap();
    let end = start + text[start..].find(',').unwrap() + 1;
    let mut old = text.into_bytes();
    old[start..end].fill(b' ');
    f.write_all_at(&old, 8).unwrap();
    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    assert_eq!(s.read_record(0, 1).unwrap(), content(0, 1, 0, rb));
}

#[test]
fn a_second_open_is_refused_until_close() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path());
    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    let pid = std::process::id();
    let held = std::fs::read_to_string(d.path().join(LOCK_FILE)).unwrap();
    assert_eq!(held.trim(), pid.to_string());
    let msg = open_err(d.path());
    assert!(msg.contains(&d.path().display().to_string()), "{msg}");
    assert!(msg.contains(&format!("pid {pid}")), "{msg}");
    assert!(matches!(
        ExpertStore::open(d.path(), opts(2 * rb)),
        Err(StoreError::Locked(_))
    ));
    s.close();
    let again = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    assert_eq!(again.read_record(0, 0).unwrap(), content(0, 0, 0, rb));
    drop(again);
    // Dropping without close() releases it too.
    ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
}
