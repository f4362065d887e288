//! Store: bit-exact round trips, commit/reopen, clear errors, slot pool policy.
mod common;
use common::{content, eventually, schema};
use gmtier_core::store::format::TensorSpec;
use gmtier_core::store::test_hooks::{block_io, record_location, slot_status};
use gmtier_core::store::{ExpertStore, Key, Need, SlotPool, StoreError, StoreOptions};
use std::path::Path;

fn opts(ram_bytes: usize) -> StoreOptions {
    StoreOptions {
        ram_bytes,
        io_threads: 3,
        queue_depth: 8,
        direct: true,
        chunk_bytes: 8192,
        turn_bytes: 0,
    }
}

fn make(dir: &Path, l: usize, e: usize) -> usize {
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    ExpertStore::create(dir, l, e, &schema(), None, Some(&mut init)).unwrap();
    let s = ExpertStore::open(dir, opts(1 << 20)).unwrap();
    s.layout().record_bytes
}

#[test]
fn layout_is_aligned_and_weights_first() {
    let s = gmtier_core::store::format::RecordLayout::new(&schema()).unwrap();
    assert_eq!(s.weights_bytes, 8192);
    assert_eq!(s.record_bytes % 4096, 0);
    assert_eq!(s.record_bytes, 8192 + 12288);
    assert!(s.tensors.iter().all(|t| t.offset % 64 == 0));
    assert_eq!(s.tensor("w1.master").unwrap().offset, 8192);
}

#[test]
fn round_trip_through_ram_writeback_and_reopen() {
    // Reads and writes at once, and taking turns of one chunk and of many.
    for turn_bytes in [0, 8192, 1 << 20] {
        round_trip(turn_bytes);
    }
}

fn round_trip(turn_bytes: usize) {
    let d = tempfile::tempdir().unwrap();
    let (nl, ne) = (2, 5);
    let rb = make(d.path(), nl, ne);
    {
        // 3 slots for 10 experts: every write goes through eviction write-back.
        let s = ExpertStore::open(d.path(), opts(3 * rb)).unwrap();
        s.set_turn_bytes(turn_bytes, 0);
        for l in 0..nl {
            for e in 0..ne {
                assert_eq!(
                    s.read_record(l, e).unwrap(),
                    content(l, e, 0, rb),
                    "initial ({l},{e})"
                );
            }
        }
        for l in 0..nl {
            for e in 0..ne {
                s.write_record(l, e, &content(l, e, 1, rb)).unwrap();
            }
        }
        assert!(
            s.metrics().writebacks >= 7,
            "dirty evictions were written back"
        );
        for l in 0..nl {
            for e in 0..ne {
                assert_eq!(
                    s.read_record(l, e).unwrap(),
                    content(l, e, 1, rb),
                    "after write-back ({l},{e})"
                );
            }
        }
        s.commit("{\"step\": 1}").unwrap();
        // A second version, committed too: the shadow slot flips back.
        s.write_record(1, 4, &content(1, 4, 2, rb)).unwrap();
        s.commit("{\"step\": 2}").unwrap();
        assert!(s.resident() <= 3);
    }
    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    assert_eq!(s.user_meta(), "{\"step\": 2}");
    for l in 0..nl {
        for e in 0..ne {
            let v = if (l, e) == (1, 4) { 2 } else { 1 };
            assert_eq!(
                s.read_record(l, e).unwrap(),
                content(l, e, v, rb),
                "reopened ({l},{e})"
            );
        }
    }
}

#[test]
fn clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 1, 3);
    let msg = |e: StoreError| e.to_string();

    let e = msg(ExpertStore::open(d.path(), opts(rb - 1)).err().unwrap());
    assert!(
        e.contains("smaller than one expert record") && e.contains("raise ram_bytes"),
        "{e}"
    );

    let e = msg(ExpertStore::open(&d.path().join("nope"), opts(rb))
        .err()
        .unwrap());
    assert!(e.contains("not found"), "{e}");

    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    let e = msg(s.request(&[(0, 0), (0, 1), (0, 2)], 0).err().unwrap());
    assert!(e.contains("only 2 slots"), "{e}");
    let e = msg(s.request(&[(1, 0)], 0).err().unwrap());
    assert!(e.contains("outside the store"), "{e}");
    let e = msg(s.release(&[(0, 0)]).err().unwrap());
    assert!(e.contains("not pinned"), "{e}");
    let e = msg(s.write_record(0, 0, &[0u8; 10]).err().unwrap());
    assert!(e.contains("records are"), "{e}");
    drop(s);

    // Corrupt one byte of a committed record: the read names layer and expert.
    let (off0, _) = record_location(&ExpertStore::open(d.path(), opts(rb)).unwrap(), 0, 2);
    let data = d.path().join("experts.safetensors");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(&[0xAB, 0xCD], off0 + 100).unwrap();
    }
    let s = ExpertStore::open(d.path(), opts(rb)).unwrap();
    let e = msg(s.read_record(0, 2).err().unwrap());
    assert!(
        e.contains("checksum mismatch") && e.contains("layer 0 expert 2"),
        "{e}"
    );
    // The store keeps working for the other experts.
    assert_eq!(s.read_record(0, 1).unwrap(), content(0, 1, 0, rb));
    drop(s);

    // Truncated file.
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 4096).unwrap();
    let e = msg(ExpertStore::open(d.path(), opts(rb)).err().unwrap());
    assert!(e.contains("truncated"), "{e}");
    f.set_len(len).unwrap();

    // Index from another store.
    let d2 = tempfile::tempdir().unwrap();
    make(d2.path(), 2, 3);
    std::fs::copy(d2.path().join("index.json"), d.path().join("index.json")).unwrap();
    let e = msg(ExpertStore::open(d.path(), opts(rb)).err().unwrap());
    assert!(e.contains("does not match"), "{e}");

    // Bad schema.
    let e = msg(TensorSpec::new("x", "f64", &[2], "weights").err().unwrap());
    assert!(e.contains("unknown dtype"), "{e}");
    let e = msg(
        ExpertStore::create(&d.path().join("z"), 1, 1, &[], None, None)
            .err()
            .unwrap(),
    );
    assert!(e.contains("schema is empty"), "{e}");
}

#[test]
fn slot_pool_policy() {
    let mut p = SlotPool::new(3);
    let k = |e: u32| -> Key { (0, e) };
    assert_eq!(p.acquire(k(0), 0, true).unwrap(), (0, false, None));
    assert_eq!(p.acquire(k(1), 0, true).unwrap(), (1, false, None));
    assert_eq!(p.acquire(k(2), 0, true).unwrap(), (2, false, None));
    // All pinned: a clear error, nothing evicted.
    let e = p.acquire(k(3), 0, true).err().unwrap().to_string();
    assert!(e.contains("all 3 slots are pinned"), "{e}");
    p.release(k(1)).unwrap();
    p.release(k(0)).unwrap();
    // LRU among unpinned: key 0 was used before key 1.
    assert_eq!(p.acquire(k(3), 0, true).unwrap(), (0, false, Some(k(0))));
    // A hit pins again.
    assert_eq!(p.acquire(k(3), 0, true).unwrap(), (0, true, None));
    assert_eq!(p.pins(0), 2);
    // Prefetch protection: a prefetched slot survives lower-priority prefetches.
    p.release(k(3)).unwrap();
    p.release(k(3)).unwrap();
    p.release(k(2)).unwrap();
    let (s5, _, _) = p.acquire(k(5), 5, false).unwrap(); // prefetch into LRU slot
    assert_eq!(p.pins(s5), 0);
    assert!(p.is_prefetched(s5));
    let (s6, _, _) = p.acquire(k(6), 1, false).unwrap();
    assert_ne!(
        s6, s5,
        "low-priority prefetch must not evict a higher-priority one"
    );
    // Demand evicts unprotected slots before prefetched ones.
    let v = p.victim(Need::Demand, |_| true).unwrap();
    assert!(!p.is_prefetched(v));
    // A wrong guess, demoted: unprotected and the first victim, even of a prefetch.
    assert!(p.demote(s5));
    assert!(!p.demote(s5), "only an unused prefetch is demoted");
    assert_eq!(p.victim(Need::Prefetch(0), |_| true), Some(s5));
    assert_eq!(p.victim(Need::Demand, |_| true), Some(s5));
    assert!(p.invalidate(k(5)));
    assert_eq!(p.lookup(k(5)), None);
}

#[test]
fn write_back_cleans_a_pinned_record_early() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 1, 4);
    {
        let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
        let k: Key = (0, 1);
        let slot = s.request(&[k], 0).unwrap().wait(None).unwrap()[0];
        unsafe { s.slot_bytes(slot) }.copy_from_slice(&content(0, 1, 1, rb));
        s.mark_dirty(&[k]).unwrap();
        assert_eq!(slot_status(&s, k), Some((true, false)));
        // Not resident, clean, duplicate: ignored; out of range: an error.
        s.write_back(&[k, (0, 3), k]).unwrap();
        assert!(s.write_back(&[(5, 0)]).is_err());
        eventually("the write-behind", || s.metrics().writebacks == 1);
        assert_eq!(slot_status(&s, k), Some((false, false)), "clean now");
        s.write_back(&[k]).unwrap(); // clean: nothing to do
        s.release(&[k]).unwrap();
        let written = s.metrics().bytes_written;
        // Evict it: no further write is needed.
        for e in [0, 2, 3] {
            assert_eq!(s.read_record(0, e).unwrap(), content(0, e, 0, rb));
        }
        assert_eq!(slot_status(&s, k), None, "evicted");
        let m = s.metrics();
        assert_eq!((m.writebacks, m.bytes_written), (1, written));
        assert!(m.evictions >= 1);
        s.commit("wb").unwrap();
        assert_eq!(
            s.metrics().writebacks,
            1,
            "commit had nothing left to write"
        );
    }
    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    for e in 0..4 {
        let v = if e == 1 { 1 } else { 0 };
        assert_eq!(s.read_record(0, e).unwrap(), content(0, e, v, rb), "({e})");
    }
}

#[test]
fn write_back_of_a_record_redirtied_during_its_write_writes_it_again() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 1, 3);
    {
        let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
        let k: Key = (0, 2);
        let slot = s.request(&[k], 0).unwrap().wait(None).unwrap()[0];
        unsafe { s.slot_bytes(slot) }.copy_from_slice(&content(0, 2, 1, rb));
        s.mark_dirty(&[k]).unwrap();
        {
            // The workers are busy: the write-back is queued and cannot finish yet.
            let _hold = block_io(&s);
            s.write_back(&[k]).unwrap();
            assert_eq!(slot_status(&s, k), Some((true, true)), "write-back running");
            // Already being written: ignored.
            s.write_back(&[k]).unwrap();
            // Adam changes the record again and marks it dirty while the write is in flight.
            unsafe { s.slot_bytes(slot) }.copy_from_slice(&content(0, 2, 2, rb));
            s.mark_dirty(&[k]).unwrap();
        }
        eventually("the first write-back", || s.metrics().writebacks == 1);
        assert_eq!(slot_status(&s, k), Some((true, false)), "still dirty");
        s.release(&[k]).unwrap();
        s.commit("v2").unwrap();
        assert_eq!(s.metrics().writebacks, 2, "commit wrote the newer version");
        assert_eq!(slot_status(&s, k), Some((false, false)));
    }
    let s = ExpertStore::open(d.path(), opts(2 * rb)).unwrap();
    assert_eq!(s.read_record(0, 2).unwrap(), content(0, 2, 2, rb));
    assert_eq!(s.read_record(0, 0).unwrap(), content(0, 0, 0, rb));
}

#[test]
fn a_write_back_in_flight_does_not_hold_back_loads() {
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 1, 4);
    // A record is 5 chunks of 4 KiB, more than the queue depth of 2: when write chunks counted
    // against the depth, no load started until the write-back had finished.
    let s = ExpertStore::open(
        d.path(),
        StoreOptions {
            ram_bytes: 3 * rb,
            io_threads: 2,
            queue_depth: 2,
            direct: true,
            chunk_bytes: 4096,
            turn_bytes: 0,
        },
    )
    .unwrap();
    let k: Key = (0, 1);
    let slot = s.request(&[k], 0).unwrap().wait(None).unwrap()[0];
    unsafe { s.slot_bytes(slot) }.copy_from_slice(&content(0, 1, 1, rb));
    s.mark_dirty(&[k]).unwrap();
    let mut ticket = {
        let _hold = block_io(&s);
        s.write_back(&[k]).unwrap();
        assert_eq!(
            slot_status(&s, k),
            Some((true, true)),
            "write-back in flight"
        );
        let ticket = s.request(&[(0, 2)], 0).unwrap();
        assert!(
            slot_status(&s, (0, 2)).is_some(),
            "the load started beside the write-back"
        );
        ticket
    };
    let got = ticket.wait(None).unwrap()[0];
    assert_eq!(unsafe { s.slot_bytes(got) }, &content(0, 2, 0, rb)[..]);
    eventually("the write-back", || s.metrics().writebacks == 1);
    s.release(&[k, (0, 2)]).unwrap();
    // The depth is raised to two records' chunks: the next record's read starts beside the
    // one before, so the I/O threads the first one's last chunks leave idle have work.
    let mut ticket = {
        let _hold = block_io(&s);
        let ticket = s.request(&[(0, 0), (0, 3)], 0).unwrap();
        assert!(slot_status(&s, (0, 0)).is_some() && slot_status(&s, (0, 3)).is_some());
        ticket
    };
    ticket.wait(None).unwrap();
    s.release(&[(0, 0), (0, 3)]).unwrap();
}

#[test]
fn create_fills_while_writing_and_a_failed_init_leaves_no_store() {
    // Records are filled into one buffer while the other is written: every record lands where
    // it belongs with its own checksum, whatever order the writes finish in.
    let d = tempfile::tempdir().unwrap();
    let rb = make(d.path(), 3, 5);
    let s = ExpertStore::open(d.path(), opts(rb)).unwrap();
    for l in 0..3 {
        for e in 0..5 {
            assert_eq!(
                s.read_record(l, e).unwrap(),
                content(l, e, 0, rb),
                "({l},{e})"
            );
        }
    }
    drop(s);

    // An init that fails part-way, with writes of earlier records still in flight: the error
    // is init's, and the half-made data file is removed.
    let d = tempfile::tempdir().unwrap();
    let mut calls = 0;
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        calls += 1;
        if (l, e) == (1, 2) {
            return Err(StoreError::InvalidArgument(
                "init(1, 2) failed: boom".into(),
            ));
        }
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    let e = ExpertStore::create(d.path(), 2, 4, &schema(), None, Some(&mut init))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("init(1, 2) failed: boom"), "{e}");
    assert_eq!(calls, 7, "filling stopped at the failure");
    assert!(!d.path().join("experts.safetensors").exists());
    assert!(!d.path().join("index.json").exists());
}
