//! The record-slot pool (format version 2): records plus a few spare slots, a changed record
//! written to a free slot, a commit freeing the superseded one, interim commits when the spares
//! run out, kills at any moment, and stores of the old two-shadow-slot format.
mod common;
use common::{content, schema};
use gmtier_core::store::format::{DATA_FILE, INDEX_FILE};
use gmtier_core::store::test_hooks::{create_shadow_store, free_slots, record_location};
use gmtier_core::store::{ExpertStore, StoreOptions};
use std::path::Path;

fn opts(ram_slots: usize, rb: usize) -> StoreOptions {
    StoreOptions {
        ram_bytes: ram_slots * rb,
        io_threads: 3,
        queue_depth: 8,
        direct: true,
        chunk_bytes: 8192,
        turn_bytes: 0,
    }
}

/// A 1 x `ne` store with `spares` spare slots and records at version 0; the record size.
fn make(dir: &Path, ne: usize, spares: usize) -> usize {
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    ExpertStore::create(dir, 1, ne, &schema(), Some(spares), Some(&mut init)).unwrap();
    let s = ExpertStore::open(dir, opts(1, 1 << 20)).unwrap();
    s.layout().record_bytes
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap()
}

/// Each expert's committed record slot, from index.json.
fn committed_slots(dir: &Path) -> Vec<u64> {
    let idx = index(dir);
    let experts = idx["experts"].as_array().unwrap();
    experts.iter().map(|e| e[0].as_u64().unwrap()).collect()
}

#[test]
fn the_file_holds_the_records_and_the_spares_only() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 5, 2);
    let s = ExpertStore::open(d.path(), opts(2, rb)).unwrap();
    let g = s.geometry();
    assert_eq!((g.version, g.disk_slots, g.spare_slots()), (2, 7, 2));
    let size = std::fs::metadata(d.path().join(DATA_FILE)).unwrap().len();
    assert_eq!(size, g.data_start + 7 * rb as u64);
    assert_eq!(committed_slots(d.path()), vec![0, 1, 2, 3, 4]);
    assert_eq!(free_slots(&s), 2);
}

#[test]
fn a_changed_record_goes_to_a_free_slot_and_the_commit_frees_the_old_one() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 4, 2);
    let s = ExpertStore::open(d.path(), opts(2, rb)).unwrap();
    let (before, _) = record_location(&s, 0, 1);
    s.write_record(0, 1, &content(0, 1, 1, rb)).unwrap();
    s.flush().unwrap();
    let (still, written) = record_location(&s, 0, 1);
    let written = written.expect("flushed");
    assert_eq!(still, before, "the committed version stays where it was");
    assert_ne!(written, before);
    assert_eq!(free_slots(&s), 1, "one spare holds the new version");
    // Written again before the commit: the uncommitted version is overwritten in place.
    s.write_record(0, 1, &content(0, 1, 2, rb)).unwrap();
    s.flush().unwrap();
    assert_eq!(record_location(&s, 0, 1).1, Some(written));
    s.commit("one").unwrap();
    assert_eq!(record_location(&s, 0, 1), (written, None));
    assert_eq!(free_slots(&s), 2, "the commit freed the superseded slot");
    assert_eq!(committed_slots(d.path())[1], 4, "the first spare");
    // Many more commits than spares: the free list is reused, the file never grows.
    for v in 3..12u64 {
        for e in 0..4 {
            s.write_record(0, e, &content(0, e, v, rb)).unwrap();
        }
        s.commit(&v.to_string()).unwrap();
        let mut slots = committed_slots(d.path());
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), 4, "no slot committed twice");
        assert!(slots.iter().all(|&x| x < 6));
    }
    drop(s);
    let s = ExpertStore::open(d.path(), opts(1, rb)).unwrap();
    assert_eq!(s.user_meta(), "11");
    assert_eq!(s.interim_commits(), 0);
    for e in 0..4 {
        assert_eq!(
            s.read_record(0, e).unwrap(),
            content(0, e, 11, rb),
            "expert {e}"
        );
    }
}

#[test]
fn when_the_spares_run_out_the_store_commits_on_its_own() {
    let d = tempfile::tempdir().unwrap();
    let ne = 6;
    let rb = make(d.path(), ne, 1);
    {
        // One RAM slot and one spare: every write evicts the dirty record before it, whose
        // write-back needs the spare; the second such eviction finds none free.
        let s = ExpertStore::open(d.path(), opts(1, rb)).unwrap();
        for e in 0..ne {
            s.write_record(0, e, &content(0, e, 1, rb)).unwrap();
        }
        s.flush().unwrap();
        let m = s.metrics();
        assert!(m.interim_commits >= ne as u64 - 2, "{m:?}");
        assert!(s.interim_commits() > 0);
        assert_eq!(
            s.user_meta(),
            "",
            "an interim commit keeps the caller's metadata"
        );
        // Dropped without a commit: what the interim commits committed stays.
    }
    let s = ExpertStore::open(d.path(), opts(1, rb)).unwrap();
    assert!(
        s.interim_commits() > 0,
        "index.json says the experts are past user_meta"
    );
    let newer = (0..ne)
        .filter(|&e| {
            let r = s.read_record(0, e).unwrap();
            assert!(
                r == content(0, e, 0, rb) || r == content(0, e, 1, rb),
                "expert {e}"
            );
            r == content(0, e, 1, rb)
        })
        .count();
    assert!(
        newer >= ne - 2,
        "{newer} of {ne} at the interim-committed version"
    );
    for e in 0..ne {
        s.write_record(0, e, &content(0, e, 2, rb)).unwrap();
    }
    s.commit("two").unwrap();
    assert_eq!(
        s.interim_commits(),
        0,
        "the caller's commit resets the count"
    );
    drop(s);
    let s = ExpertStore::open(d.path(), opts(2, rb)).unwrap();
    for e in 0..ne {
        assert_eq!(
            s.read_record(0, e).unwrap(),
            content(0, e, 2, rb),
            "expert {e}"
        );
    }
}

#[test]
fn a_torn_write_into_a_spare_leaves_the_committed_record() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 3, 2);
    {
        let s = ExpertStore::open(d.path(), opts(3, rb)).unwrap();
        for e in 0..3 {
            s.write_record(0, e, &content(0, e, 1, rb)).unwrap();
        }
        s.commit("v1").unwrap();
        s.write_record(0, 2, &content(0, 2, 2, rb)).unwrap();
        s.flush().unwrap();
        // A kill mid-write: half a record of garbage where the uncommitted version went.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join(DATA_FILE))
            .unwrap();
        let off = record_location(&s, 0, 2).1.unwrap();
        f.write_all_at(&vec![0xEE; rb / 2], off).unwrap();
    }
    let s = ExpertStore::open(d.path(), opts(1, rb)).unwrap();
    assert_eq!(s.user_meta(), "v1");
    for e in 0..3 {
        assert_eq!(
            s.read_record(0, e).unwrap(),
            content(0, e, 1, rb),
            "expert {e}"
        );
    }
}

/// A real kill with few spares (so interim commits happen too): every expert must read back
/// whole, at the version of the last commit or, after interim commits, one newer.
#[test]
fn sigkill_with_few_spares_leaves_every_expert_whole() {
    let ne = 6;
    if let Ok(dir) = std::env::var("GMTIER_POOL_CRASH_CHILD") {
        let rb: usize = std::env::var("GMTIER_POOL_CRASH_RB")
            .unwrap()
            .parse()
            .unwrap();
        let s = ExpertStore::open(Path::new(&dir), opts(2, rb)).unwrap();
        for v in 1u64.. {
            for e in 0..ne {
                s.write_record(0, e, &content(0, e, v, rb)).unwrap();
            }
            s.commit(&v.to_string()).unwrap();
        }
        unreachable!();
    }
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), ne, 2);
    let mut last = 0;
    let env = [
        ("GMTIER_POOL_CRASH_CHILD", d.path().display().to_string()),
        ("GMTIER_POOL_CRASH_RB", rb.to_string()),
    ];
    let test = "sigkill_with_few_spares_leaves_every_expert_whole";
    common::kill_child_repeatedly(test, &env, |round| {
        let s = ExpertStore::open(d.path(), opts(2, rb)).unwrap();
        let v: u64 = s.user_meta().parse().unwrap_or(0);
        let ahead = s.interim_commits() > 0;
        for e in 0..ne {
            let r = s.read_record(0, e).unwrap();
            let at = |w| r == content(0, e, w, rb);
            assert!(
                at(v) || (ahead && at(v + 1)),
                "round {round} expert {e}: not at version {v} (interim commits: {ahead})"
            );
        }
        last = v;
    });
    assert!(last > 0, "the child committed nothing before the kill");
}

#[test]
fn a_store_of_the_shadow_slot_format_still_opens_and_trains() {
    let d = tempfile::tempdir().unwrap();
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    create_shadow_store(d.path(), 1, 3, &schema(), Some(&mut init)).unwrap();
    let header = std::fs::read(d.path().join(DATA_FILE)).unwrap();
    let text = String::from_utf8_lossy(&header[8..4096]);
    assert!(text.contains("\"experts.0.2.1.w1\""), "version 1 names");
    let s = ExpertStore::open(d.path(), opts(1, 1 << 20)).unwrap();
    let rb = s.layout().record_bytes;
    assert_eq!((s.geometry().version, s.geometry().disk_slots), (1, 6));
    drop(s);
    for v in 1..4u64 {
        let s = ExpertStore::open(d.path(), opts(1, rb)).unwrap();
        for e in 0..3 {
            assert_eq!(s.read_record(0, e).unwrap(), content(0, e, v - 1, rb));
            s.write_record(0, e, &content(0, e, v, rb)).unwrap();
        }
        s.commit(&v.to_string()).unwrap();
        // The index keeps the version 1 spelling: shadow slot 0 or 1 of each expert.
        let idx = index(d.path());
        assert_eq!(idx["version"], 1);
        assert_eq!(committed_slots(d.path()), vec![v % 2; 3]);
    }
}
