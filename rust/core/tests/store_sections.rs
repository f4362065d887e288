//! Section reads: only the sections asked for are read and verified against their own crc32.
mod common;
use common::{content, eventually, schema};
use gmtier_core::store::test_hooks::{block_io, record_location};
use gmtier_core::store::{ExpertStore, Key, Sections, StoreError, StoreOptions};
use std::path::Path;

const WB: usize = 8192;
const RB: usize = 8192 + 12288;

fn opts(slots: usize) -> StoreOptions {
    StoreOptions {
        ram_bytes: slots * RB,
        io_threads: 3,
        queue_depth: 8,
        direct: true,
        chunk_bytes: 8192,
        turn_bytes: 0,
    }
}

fn make(dir: &Path, nl: usize, ne: usize) {
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    ExpertStore::create(dir, nl, ne, &schema(), None, Some(&mut init)).unwrap();
}

/// Request `k`'s sections and wait; returns the slot (pinned).
fn get(s: &ExpertStore, k: Key, secs: Sections) -> usize {
    s.request_sections(&[k], 0, secs)
        .unwrap()
        .wait(None)
        .unwrap()[0]
}

fn bytes(s: &ExpertStore, slot: usize) -> Vec<u8> {
    unsafe { s.slot_bytes(slot) }.to_vec()
}

fn corrupt(dir: &Path, l: usize, e: usize, at: usize) {
    use std::os::unix::fs::FileExt;
    let (off0, _) = record_location(&ExpertStore::open(dir, opts(1)).unwrap(), l, e);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("experts.safetensors"))
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off0 + at as u64).unwrap();
    f.write_all_at(&[b[0] ^ 0x5A], off0 + at as u64).unwrap();
}

#[test]
fn sections_read_separately_equal_a_whole_read() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 3);
    let s = ExpertStore::open(d.path(), opts(2)).unwrap();
    assert_eq!(s.layout().weights_bytes, WB);
    assert_eq!(s.layout().record_bytes, RB);
    let whole = content(0, 0, 0, RB);

    // Weights only: one section read of WB bytes.
    let slot = get(&s, (0, 0), Sections::WEIGHTS);
    assert_eq!(s.slot_sections(slot).unwrap(), Sections::WEIGHTS);
    let m = s.metrics();
    assert_eq!((m.bytes_read, m.reads, m.section_reads), (WB as u64, 1, 1));
    assert_eq!(bytes(&s, slot)[..WB], whole[..WB]);

    // Then the state, on the resident (still pinned) slot: only the missing section is read.
    assert_eq!(get(&s, (0, 0), Sections::STATE), slot);
    let m = s.metrics();
    assert_eq!((m.bytes_read, m.reads, m.section_reads), (RB as u64, 2, 2));
    assert_eq!(s.slot_sections(slot).unwrap(), Sections::ALL);
    assert_eq!(
        bytes(&s, slot),
        whole,
        "weights + state == the whole record"
    );

    // The whole record now: a hit, nothing read.
    assert_eq!(get(&s, (0, 0), Sections::ALL), slot);
    assert_eq!(s.metrics().bytes_read, RB as u64);
    s.release(&[(0, 0)]).unwrap();
    s.release(&[(0, 0)]).unwrap();
    s.release(&[(0, 0)]).unwrap();
    assert_eq!(s.pinned(), 0);

    // State first, then weights; a full read of another expert for comparison.
    let b = get(&s, (0, 1), Sections::STATE);
    assert_eq!(s.slot_sections(b).unwrap(), Sections::STATE);
    assert_eq!(bytes(&s, b)[WB..], content(0, 1, 0, RB)[WB..]);
    get(&s, (0, 1), Sections::WEIGHTS);
    assert_eq!(bytes(&s, b), content(0, 1, 0, RB));
    assert_eq!(s.metrics().bytes_read, 2 * RB as u64);
    s.release(&[(0, 1)]).unwrap();
    s.release(&[(0, 1)]).unwrap();
    assert_eq!(s.read_record(0, 2).unwrap(), content(0, 2, 0, RB));
    let m = s.metrics();
    assert_eq!(
        (m.bytes_read, m.reads, m.section_reads),
        (3 * RB as u64, 5, 4)
    );
    assert_eq!(s.pinned(), 0);
}

#[test]
fn a_section_asked_for_during_a_read_is_read_next() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 2);
    let s = ExpertStore::open(d.path(), opts(2)).unwrap();
    let (mut a, mut b) = {
        let _hold = block_io(&s);
        // The weights read is in flight (queued behind the held workers) when the whole
        // record is asked for: the state follows it into the same slot.
        let a = s.request_sections(&[(0, 1)], 0, Sections::WEIGHTS).unwrap();
        let b = s.request(&[(0, 1)], 0).unwrap();
        s.prefetch_sections(&[(0, 0)], 1, Sections::WEIGHTS)
            .unwrap();
        (a, b)
    };
    let sa = a.wait(None).unwrap()[0];
    let sb = b.wait(None).unwrap()[0];
    assert_eq!(sa, sb);
    assert_eq!(bytes(&s, sa), content(0, 1, 0, RB));
    s.release(&[(0, 1)]).unwrap();
    s.release(&[(0, 1)]).unwrap();
    // The prefetched weights of (0, 0): a weights request is a hit; the whole record reads
    // only the state.
    eventually("the prefetch", || s.metrics().reads >= 3);
    assert_eq!(s.metrics().bytes_read, (RB + WB) as u64);
    let hits = s.metrics().hits;
    get(&s, (0, 0), Sections::WEIGHTS);
    assert_eq!(s.metrics().hits, hits + 1);
    let slot = get(&s, (0, 0), Sections::ALL);
    assert_eq!(bytes(&s, slot), content(0, 0, 0, RB));
    let m = s.metrics();
    assert_eq!(
        (m.bytes_read, m.reads, m.section_reads),
        (2 * RB as u64, 4, 4)
    );
    s.release(&[(0, 0)]).unwrap();
    s.release(&[(0, 0)]).unwrap();
    assert_eq!(s.pinned(), 0);
}

#[test]
fn a_corrupt_state_section_fails_state_and_whole_reads_not_weights_reads() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 3);
    corrupt(d.path(), 0, 2, WB + 100);
    let msg = |e: StoreError| e.to_string();
    let s = ExpertStore::open(d.path(), opts(2)).unwrap();
    // A whole read catches it.
    let e = msg(s.read_record(0, 2).err().unwrap());
    assert!(
        e.contains("checksum mismatch") && e.contains("layer 0 expert 2") && e.contains("restore"),
        "{e}"
    );
    assert_eq!(s.pinned(), 0);
    // The weights alone are intact and verified.
    let slot = get(&s, (0, 2), Sections::WEIGHTS);
    assert_eq!(bytes(&s, slot)[..WB], content(0, 2, 0, RB)[..WB]);
    // Their state is not.
    let e = msg(s
        .request_sections(&[(0, 2)], 0, Sections::STATE)
        .unwrap()
        .wait(None)
        .err()
        .unwrap());
    assert!(
        e.contains("checksum mismatch")
            && e.contains("layer 0 expert 2")
            && e.contains("state section"),
        "{e}"
    );
    // The slot keeps its valid weights (and the first pin); the failed request holds no pin.
    assert_eq!(s.slot_sections(slot).unwrap(), Sections::WEIGHTS);
    assert_eq!(s.pinned(), 1);
    let e = msg(s.mark_dirty(&[(0, 2)]).err().unwrap());
    assert!(e.contains("request the whole record"), "{e}");
    // A request dropped without wait() while its state read fails gives its pin back once.
    {
        let _hold = block_io(&s);
        drop(s.request_sections(&[(0, 2)], 0, Sections::STATE).unwrap());
    }
    eventually("the state read to fail", || s.metrics().read_errors >= 3);
    assert_eq!(s.pinned(), 1);
    s.release(&[(0, 2)]).unwrap();
    assert_eq!(s.pinned(), 0);
    assert!(s.release(&[(0, 2)]).is_err());
    // Other experts are unaffected.
    assert_eq!(s.read_record(0, 1).unwrap(), content(0, 1, 0, RB));
}

#[test]
fn mark_dirty_needs_the_whole_record_and_write_back_records_section_crcs() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 3);
    {
        let s = ExpertStore::open(d.path(), opts(2)).unwrap();
        let slot = get(&s, (0, 1), Sections::WEIGHTS);
        let e = s.mark_dirty(&[(0, 1)]).err().unwrap().to_string();
        assert!(
            e.contains("holds only its weights section") && e.contains("sections=\"all\""),
            "{e}"
        );
        assert!(matches!(
            s.mark_dirty(&[(0, 1)]),
            Err(StoreError::InvalidArgument(_))
        ));
        get(&s, (0, 1), Sections::STATE);
        unsafe { s.slot_bytes(slot) }.copy_from_slice(&content(0, 1, 7, RB));
        s.mark_dirty(&[(0, 1)]).unwrap();
        s.release(&[(0, 1)]).unwrap();
        s.release(&[(0, 1)]).unwrap();
        s.commit("v7").unwrap();
    }
    let s = ExpertStore::open(d.path(), opts(2)).unwrap();
    // The written-back record's sections verify on their own.
    let slot = get(&s, (0, 1), Sections::STATE);
    assert_eq!(bytes(&s, slot)[WB..], content(0, 1, 7, RB)[WB..]);
    get(&s, (0, 1), Sections::WEIGHTS);
    assert_eq!(bytes(&s, slot), content(0, 1, 7, RB));
    assert_eq!(s.metrics().bytes_read, RB as u64);
    assert_eq!(s.metrics().section_reads, 2);
    s.release(&[(0, 1)]).unwrap();
    s.release(&[(0, 1)]).unwrap();
}

/// Rewrite index.json as the code before section reads wrote it (no section_crcs).
fn strip_section_crcs(dir: &Path) {
    let p = dir.join("index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    assert!(v.as_object_mut().unwrap().remove("section_crcs").is_some());
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn an_index_without_section_crcs_reads_whole_records_until_it_learns_them() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 3);
    strip_section_crcs(d.path());
    corrupt(d.path(), 0, 2, WB + 5);
    {
        let s = ExpertStore::open(d.path(), opts(2)).unwrap();
        // No section crc to check a weights read against: the whole record is read.
        let slot = get(&s, (0, 0), Sections::WEIGHTS);
        assert_eq!(s.slot_sections(slot).unwrap(), Sections::ALL);
        assert_eq!(bytes(&s, slot), content(0, 0, 0, RB));
        let m = s.metrics();
        assert_eq!((m.bytes_read, m.section_reads), (RB as u64, 0));
        s.release(&[(0, 0)]).unwrap();
        // So is a corrupt state caught even by a weights request.
        let e = s
            .request_sections(&[(0, 2)], 0, Sections::WEIGHTS)
            .unwrap()
            .wait(None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("checksum mismatch") && e.contains("expert 2"),
            "{e}"
        );
        // The verified whole read gave (0, 0)'s section crcs; the next commit records them.
        s.commit("learned").unwrap();
    }
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("index.json")).unwrap()).unwrap();
    let secs = v["section_crcs"].as_array().unwrap();
    assert!(
        secs[0].is_array() && secs[1].is_null() && secs[2].is_null(),
        "{secs:?}"
    );
    let s = ExpertStore::open(d.path(), opts(2)).unwrap();
    let slot = get(&s, (0, 0), Sections::WEIGHTS);
    assert_eq!(s.slot_sections(slot).unwrap(), Sections::WEIGHTS);
    assert_eq!(s.metrics().bytes_read, WB as u64);
    get(&s, (0, 0), Sections::STATE);
    assert_eq!(bytes(&s, slot), content(0, 0, 0, RB));
    s.release(&[(0, 0)]).unwrap();
    s.release(&[(0, 0)]).unwrap();
    let slot = get(&s, (0, 1), Sections::STATE);
    assert_eq!(bytes(&s, slot), content(0, 1, 0, RB));
    assert_eq!(s.metrics().bytes_read, (2 * RB) as u64);
    s.release(&[(0, 1)]).unwrap();
}

#[test]
fn concurrent_mixed_section_requests_see_verified_bytes() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 2, 6);
    let s = std::sync::Arc::new(ExpertStore::open(d.path(), opts(4)).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut x = 777 + t;
                for i in 0..300 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let secs =
                        [Sections::WEIGHTS, Sections::STATE, Sections::ALL][(x >> 33) as usize % 3];
                    let n = 1 + (x >> 60) as usize % 2;
                    let keys: Vec<Key> = (0..n)
                        .map(|j| {
                            (
                                (x >> (8 + j * 8)) as u32 % 2,
                                (x >> (20 + j * 8)) as u32 % 6,
                            )
                        })
                        .collect();
                    if i % 7 == 0 {
                        let p = [Sections::WEIGHTS, Sections::STATE][(x >> 44) as usize % 2];
                        s.prefetch_sections(&[((x >> 40) as u32 % 2, (x >> 50) as u32 % 6)], 1, p)
                            .unwrap();
                    }
                    let slots = s
                        .request_sections(&keys, 0, secs)
                        .unwrap()
                        .wait(Some(std::time::Duration::from_secs(20)))
                        .unwrap();
                    for (k, &slot) in keys.iter().zip(&slots) {
                        assert!(s.slot_sections(slot).unwrap().contains(secs));
                        let want = content(k.0 as usize, k.1 as usize, 0, RB);
                        let got = bytes(&s, slot);
                        if secs.contains(Sections::WEIGHTS) {
                            assert_eq!(got[..WB], want[..WB], "{k:?} weights");
                        }
                        if secs.contains(Sections::STATE) {
                            assert_eq!(got[WB..], want[WB..], "{k:?} state");
                        }
                    }
                    s.release(&keys).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Let the last prefetches land, then nothing stays pinned.
    eventually("every pin released", || s.pinned() == 0);
    assert!(s.resident() <= 4);
    let m = s.metrics();
    assert_eq!(m.read_errors, 0);
    assert!(m.section_reads > 0);
}

#[test]
fn filled_section_counts_as_valid_and_round_trips() {
    // Backward reads only the state, the update rewrites the weights from the master copy:
    // mark_dirty_filled(WEIGHTS) makes the whole record valid, and the new bytes persist.
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 2);
    let k: Key = (0, 1);
    let new = content(0, 1, 5, RB);
    {
        let s = ExpertStore::open(d.path(), opts(2)).unwrap();
        let slot = get(&s, k, Sections::STATE);
        assert!(matches!(
            s.mark_dirty(&[k]),
            Err(StoreError::InvalidArgument(_))
        ));
        unsafe { s.slot_bytes(slot) }.copy_from_slice(&new);
        s.mark_dirty_filled(&[k], Sections::WEIGHTS).unwrap();
        assert_eq!(s.slot_sections(slot).unwrap(), Sections::ALL);
        assert_eq!(s.metrics().bytes_read as usize, RB - WB);
        s.release(&[k]).unwrap();
        s.commit("filled").unwrap();
    }
    let s = ExpertStore::open(d.path(), opts(2)).unwrap();
    let slot = get(&s, k, Sections::ALL);
    assert_eq!(bytes(&s, slot), new);
    s.release(&[k]).unwrap();
}

#[test]
fn pin_resident_pins_only_records_holding_the_sections_and_reads_nothing() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 4);
    let s = ExpertStore::open(d.path(), opts(3)).unwrap();
    let slot = get(&s, (0, 0), Sections::WEIGHTS);
    s.release(&[(0, 0)]).unwrap();
    let before = s.metrics();
    // Weights valid: pinned; not resident: None and no read queued; state not read: None.
    let got = s
        .pin_resident(&[(0, 0), (0, 1)], Sections::WEIGHTS)
        .unwrap();
    assert_eq!(got, vec![Some(slot), None]);
    assert_eq!(
        s.pin_resident(&[(0, 0)], Sections::ALL).unwrap(),
        vec![None]
    );
    let m = s.metrics();
    assert_eq!(
        (m.reads, m.hits, m.misses),
        (before.reads, before.hits, before.misses)
    );
    assert_eq!(s.pinned(), 1);
    assert_eq!(bytes(&s, slot)[..WB], content(0, 0, 0, RB)[..WB]);
    // The pin holds: two more experts through the other two slots never take it.
    for k in [(0, 1), (0, 2), (0, 3)] {
        assert_ne!(get(&s, k, Sections::ALL), slot);
        s.release(&[k]).unwrap();
    }
    s.release(&[(0, 0)]).unwrap();
    assert_eq!(s.pinned(), 0, "one release per pin given");
    assert!(s.pin_resident(&[(1, 0)], Sections::WEIGHTS).is_err());
}

#[test]
fn demote_prefetched_cancels_reads_not_started_and_evicts_wrong_guesses_first() {
    let d = tempfile::tempdir().unwrap();
    make(d.path(), 1, 5);
    let s = ExpertStore::open(d.path(), opts(3)).unwrap();
    // Every slot pinned: a prefetch stays queued, and the demotion cancels it.
    let keys: [Key; 3] = [(0, 0), (0, 1), (0, 2)];
    s.request(&keys, 0).unwrap().wait(None).unwrap();
    s.prefetch(&[(0, 4)], 1).unwrap();
    assert_eq!(s.demote_prefetched(&[(0, 4), (0, 3)]).unwrap(), 1);
    s.release(&keys).unwrap();
    let reads = s.metrics().reads;
    std::thread::sleep(std::time::Duration::from_millis(50));
    let m = s.metrics();
    assert_eq!(
        (m.reads, m.prefetch_cancelled),
        (reads, 1),
        "the cancelled prefetch never read"
    );
    assert!(s.pin_resident(&[(0, 4)], Sections::ALL).unwrap()[0].is_none());
    // A resident unused prefetch would outlive older records; demoted, it goes first.
    s.prefetch(&[(0, 4)], 5).unwrap();
    eventually("the prefetch", || s.metrics().reads > reads);
    eventually("its slot", || {
        let p = s.pin_resident(&[(0, 4)], Sections::ALL).unwrap();
        p[0].is_some() && s.release(&[(0, 4)]).is_ok()
    });
    // It took (0, 0)'s slot; (0, 1) is the least recently used of the others now.
    assert_eq!(s.demote_prefetched(&[(0, 4)]).unwrap(), 1);
    assert_eq!(s.demote_prefetched(&[(0, 4)]).unwrap(), 0, "demoted once");
    get(&s, (0, 3), Sections::ALL);
    s.release(&[(0, 3)]).unwrap();
    let resident = |k: Key| s.pin_resident(&[k], Sections::NONE).unwrap()[0].is_some();
    assert!(!resident((0, 4)), "the demoted prefetch was evicted");
    for k in [(0, 1), (0, 2)] {
        assert!(resident(k), "instead of the least recently used record");
        s.release(&[k]).unwrap();
    }
}
