//! Store under concurrency and crashes: budgets, pins, coalescing, no deadlock, no torn records.
mod common;
use gmtier_core::store::format::TensorSpec;
use gmtier_core::store::test_hooks::record_location;
use gmtier_core::store::{ExpertStore, Key, StoreOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn schema() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w", "f32", &[1024], "weights").unwrap(),
        TensorSpec::new("m", "f32", &[1024], "state").unwrap(),
    ]
}

/// Record of (layer, expert) at version v: every u64 word says who and which version.
fn content(l: usize, e: usize, v: u64, n: usize) -> Vec<u8> {
    let word = ((l as u64) << 48) | ((e as u64) << 32) | v;
    (0..n / 8)
        .flat_map(|i| (word ^ (i as u64 * 0x9E37_79B9)).to_le_bytes())
        .collect()
}

fn version_of(l: usize, e: usize, rec: &[u8]) -> Option<u64> {
    let w0 = u64::from_le_bytes(rec[..8].try_into().unwrap());
    let v = w0 & 0xFFFF_FFFF;
    (content(l, e, v, rec.len()) == rec).then_some(v)
}

fn opts(ram_bytes: usize) -> StoreOptions {
    StoreOptions {
        ram_bytes,
        io_threads: 4,
        queue_depth: 6,
        direct: true,
        chunk_bytes: 4096,
        turn_bytes: 0,
    }
}

fn make(dir: &Path, nl: usize, ne: usize) -> usize {
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    ExpertStore::create(dir, nl, ne, &schema(), None, Some(&mut init)).unwrap();
    8192
}

#[test]
fn concurrent_requests_complete_within_budget_and_pins_hold() {
    let d = tempfile::tempdir().unwrap();
    let (nl, ne) = (2, 8);
    let rb = make(d.path(), nl, ne);
    // Pins a request takes are held while it waits for its other keys, so concurrent requests
    // only always complete when their pins fit together: the pinned expert + 4 threads x 2 keys.
    // With fewer slots, four threads each holding one key can wait on each other until timeout.
    // 9 slots for 14 demanded keys (and prefetches) still forces constant eviction.
    let slots = 1 + 4 * 2;
    let s = Arc::new(ExpertStore::open(d.path(), opts(slots * rb)).unwrap());
    // One expert stays pinned throughout: its slot must never be reused.
    let pinned_key: Key = (0, 0);
    let pslot = s.request(&[pinned_key], 0).unwrap().wait(None).unwrap()[0];
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut x = 12345u64 + t;
                for i in 0..150 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let n = 1 + (x >> 60) as usize % 2;
                    let keys: Vec<Key> = (0..n)
                        .map(|j| {
                            (
                                (x >> (8 + j * 8)) as u32 % 2,
                                1 + (x >> (20 + j * 8)) as u32 % 7,
                            )
                        })
                        .collect();
                    if i % 5 == 0 {
                        s.prefetch(&[(1, (x >> 40) as u32 % 8)], 1).unwrap();
                    }
                    let got = s
                        .request(&keys, 0)
                        .unwrap()
                        .wait(Some(Duration::from_secs(20)))
                        .unwrap();
                    for (k, slot) in keys.iter().zip(&got) {
                        assert_ne!(*slot, pslot, "a pinned slot was reused");
                        let rec = unsafe { s.slot_bytes(*slot) };
                        assert_eq!(
                            version_of(k.0 as usize, k.1 as usize, rec),
                            Some(0),
                            "wrong data for {k:?}"
                        );
                    }
                    assert!(s.resident() <= slots);
                    s.release(&keys).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(version_of(0, 0, unsafe { s.slot_bytes(pslot) }), Some(0));
    s.release(&[pinned_key]).unwrap();
    assert_eq!(s.pinned(), 0, "every pin was released");
    let m = s.metrics();
    assert!(
        m.queue_depth_max <= 6 + 2,
        "queue depth bounded: {}",
        m.queue_depth_max
    );
    assert!(m.hits + m.misses >= 600);
}

#[test]
fn duplicate_concurrent_requests_read_once() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 1, 4);
    let s = ExpertStore::open(d.path(), opts(4 * rb)).unwrap();
    let mut t1 = s.request(&[(0, 3)], 0).unwrap();
    let mut t2 = s.request(&[(0, 3), (0, 3)], 0).unwrap();
    let a = t1.wait(None).unwrap();
    let b = t2.wait(None).unwrap();
    assert_eq!(a[0], b[0]);
    assert_eq!(b.len(), 2);
    assert_eq!(s.metrics().reads, 1);
    s.release(&[(0, 3)]).unwrap();
    s.release(&[(0, 3)]).unwrap();
    // Prefetch then request: a prefetch hit, still one read.
    s.prefetch(&[(0, 1)], 3).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.request(&[(0, 1)], 0).unwrap().wait(None).unwrap();
    let m = s.metrics();
    assert_eq!((m.reads, m.prefetch_hits), (2, 1));
    s.release(&[(0, 1)]).unwrap();
}

#[test]
fn all_slots_pinned_blocks_until_release() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 1, 4);
    let s = Arc::new(ExpertStore::open(d.path(), opts(2 * rb)).unwrap());
    s.request(&[(0, 0), (0, 1)], 0).unwrap().wait(None).unwrap();
    // Nothing can be evicted: a timed wait says why instead of hanging.
    let e = s
        .request(&[(0, 2)], 0)
        .unwrap()
        .wait(Some(Duration::from_millis(100)))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("2 of 2 RAM slots are pinned"), "{e}");
    let mut t = s.request(&[(0, 3)], 0).unwrap();
    // A timed-out ticket stays pending: the same ticket completes once a slot frees.
    assert!(t.wait(Some(Duration::from_millis(50))).is_err());
    let s2 = s.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        s2.release(&[(0, 1)]).unwrap();
    });
    let got = t.wait(Some(Duration::from_secs(10))).unwrap();
    releaser.join().unwrap();
    assert_eq!(version_of(0, 3, unsafe { s.slot_bytes(got[0]) }), Some(0));
    assert!(s.metrics().stall_s > 0.05);
}

/// Copy on write: a torn write into the slot of an uncommitted version and a drop without
/// commit leave exactly the committed records.
#[test]
fn crash_during_writeback_keeps_committed_state() {
    let d = tempfile::tempdir().unwrap();
    let (nl, ne) = (1, 6);
    let rb = make(d.path(), nl, ne);
    {
        let s = ExpertStore::open(d.path(), opts(3 * rb)).unwrap();
        for e in 0..ne {
            s.write_record(0, e, &content(0, e, 1, rb)).unwrap();
        }
        s.commit("v1").unwrap();
        // Version 2 reaches the disk (eviction write-back + flush) but is never committed.
        for e in 0..ne {
            s.write_record(0, e, &content(0, e, 2, rb)).unwrap();
        }
        s.flush().unwrap();
        // And a write-back torn by a "kill": half a record of garbage in the uncommitted slots.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join("experts.safetensors"))
            .unwrap();
        for e in 0..ne {
            let (_, written) = record_location(&s, 0, e);
            let off = written.expect("version 2 was written back");
            f.write_all_at(&vec![0xEE; rb / 2], off).unwrap();
        }
        // Dropped without commit.
    }
    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    assert_eq!(s.user_meta(), "v1");
    for e in 0..ne {
        assert_eq!(
            version_of(0, e, &s.read_record(0, e).unwrap()),
            Some(1),
            "expert {e}"
        );
    }
}

/// A real kill: a child process commits versions in a loop and is SIGKILLed at a random
/// moment; every expert must then be at the version the index says was committed last.
#[test]
fn sigkill_during_commits_leaves_no_torn_expert() {
    if let Ok(dir) = std::env::var("GMTIER_CRASH_CHILD") {
        let s = ExpertStore::open(Path::new(&dir), opts(3 * 8192)).unwrap();
        for v in 1u64.. {
            for e in 0..6 {
                s.write_record(0, e, &content(0, e, v, 8192)).unwrap();
            }
            s.commit(&v.to_string()).unwrap();
        }
        unreachable!();
    }
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 6);
    let mut last = 0;
    let env = [("GMTIER_CRASH_CHILD", d.path().display().to_string())];
    common::kill_child_repeatedly(
        "sigkill_during_commits_leaves_no_torn_expert",
        &env,
        |round| {
            let s = ExpertStore::open(d.path(), opts(2 * 8192)).unwrap();
            let v: u64 = s.user_meta().parse().unwrap_or(0);
            for e in 0..6 {
                assert_eq!(
                    version_of(0, e, &s.read_record(0, e).unwrap()),
                    Some(v),
                    "round {round} expert {e}"
                );
            }
            last = v;
        },
    );
    assert!(last > 0, "the child committed nothing before the kill");
}
