//! The GPU tier's accounting (`store::gpu`): slot states, pins, prefetch policy, and the RAM pins
//! copies in flight hold, whose completion wakes the store's waiters.
mod common;
use common::{content, schema};
use gmtier_core::store::gpu::{copy_done_host_fn, Acquired, GpuSlotState, Prefetch};
use gmtier_core::store::{ExpertStore, GpuSlots, Key, StoreOptions};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// A store of one layer of 8 experts with `ram_records` RAM slots and a GPU tier of `gpu_slots`.
fn open(dir: &Path, ram_records: usize, gpu_slots: usize) -> (ExpertStore, GpuSlots) {
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    ExpertStore::create(dir, 1, 8, &schema(), None, Some(&mut init)).unwrap();
    let rb = gmtier_core::store::format::RecordLayout::new(&schema())
        .unwrap()
        .record_bytes;
    let opts = StoreOptions {
        ram_bytes: ram_records * rb,
        io_threads: 2,
        queue_depth: 8,
        direct: false,
        chunk_bytes: 8192,
        turn_bytes: 0,
    };
    let s = ExpertStore::open(dir, opts).unwrap();
    let gpu = s.gpu_slots(gpu_slots).unwrap();
    (s, gpu)
}

/// Pin `key`'s RAM record (reading it): its RAM slot.
fn pin(s: &ExpertStore, key: Key) -> usize {
    s.request(&[key], 0).unwrap().wait(None).unwrap()[0]
}

/// Acquire `key` through its RAM record; returns the acquire's GPU slot and copy.
fn acquire(s: &ExpertStore, gpu: &GpuSlots, key: Key) -> Acquired {
    let ram = pin(s, key);
    gpu.acquire(key, ram, false).unwrap().unwrap()
}

#[test]
fn a_finished_copy_wakes_a_request_blocked_on_a_full_ram_tier() {
    let d = tempfile::tempdir().unwrap();
    let (s, gpu) = open(d.path(), 2, 2);
    // Both RAM slots end up pinned by copies still in flight (their acquires released).
    let mut copies = vec![];
    for e in 0..2 {
        let a = acquire(&s, &gpu, (0, e));
        assert_eq!(gpu.state(a.slot).unwrap(), GpuSlotState::Copying);
        copies.push(a.copy.unwrap());
        assert_eq!(gpu.release(&[(0, e)]).unwrap(), vec![a.slot]);
    }
    assert_eq!(s.pinned(), 2, "the copies hold the RAM records they read");
    let mut ticket = s.request(&[(0, 5)], 0).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || tx.send(ticket.wait(None).map(|v| v.len())).unwrap());
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "no RAM slot is free before a copy is done"
    );
    gpu.copy_done(copies[0]).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("woken by the copy's completion");
    assert_eq!(got.unwrap(), 1);
    waiter.join().unwrap();
    assert!(gpu.copy_done(copies[0]).is_err(), "a copy is done once");
    gpu.copy_done(copies[1]).unwrap();
    gpu.wait_copies(Some(Duration::from_secs(1))).unwrap();
    s.release(&[(0, 5)]).unwrap();
    assert_eq!(s.pinned(), 0);
}

#[test]
fn the_host_function_reports_the_copy_and_wait_copies_returns() {
    let d = tempfile::tempdir().unwrap();
    let (s, gpu) = open(d.path(), 2, 1);
    let a = acquire(&s, &gpu, (0, 1));
    gpu.release(&[(0, 1)]).unwrap();
    assert!(gpu.wait_copies(Some(Duration::from_millis(50))).is_err());
    let token = gpu.done_token(a.copy.unwrap()) as usize;
    // As the CUDA driver does: the host function runs on a thread of its own.
    std::thread::spawn(move || unsafe { copy_done_host_fn(token as *mut std::ffi::c_void) });
    gpu.wait_copies(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.pinned(), 0);
    assert_eq!(gpu.state(a.slot).unwrap(), GpuSlotState::Ready);
    assert_eq!(gpu.metrics().copies_in_flight, 0);
}

#[test]
fn a_stale_slot_is_dropped_at_its_last_release() {
    let d = tempfile::tempdir().unwrap();
    let (s, gpu) = open(d.path(), 4, 2);
    let a = acquire(&s, &gpu, (0, 3));
    gpu.copy_done(a.copy.unwrap()).unwrap();
    let b = acquire(&s, &gpu, (0, 3));
    assert_eq!((b.slot, b.copy), (a.slot, None), "a hit copies nothing");
    gpu.invalidate(&[(0, 3)]);
    assert_eq!(gpu.state(a.slot).unwrap(), GpuSlotState::Stale);
    assert!(!gpu.holds((0, 3)));
    assert!(gpu.acquire_resident(&[(0, 3)], 1).unwrap().is_empty());
    gpu.release(&[(0, 3)]).unwrap();
    assert_eq!(
        gpu.state(a.slot).unwrap(),
        GpuSlotState::Stale,
        "still pinned"
    );
    gpu.release(&[(0, 3)]).unwrap();
    assert_eq!(gpu.state(a.slot).unwrap(), GpuSlotState::Free);
    assert_eq!(gpu.lookup((0, 3)), None);
    // Unpinned, a copy is dropped at once.
    let c = acquire(&s, &gpu, (0, 4));
    gpu.release(&[(0, 4)]).unwrap();
    gpu.copy_done(c.copy.unwrap()).unwrap();
    gpu.invalidate(&[(0, 4)]);
    assert_eq!(gpu.state(c.slot).unwrap(), GpuSlotState::Free);
    assert_eq!(s.pinned(), 0);
}

#[test]
fn a_prefetched_slot_is_evicted_first_after_demote() {
    let d = tempfile::tempdir().unwrap();
    let (s, gpu) = open(d.path(), 6, 2);
    let a = acquire(&s, &gpu, (0, 0));
    gpu.release(&[(0, 0)]).unwrap();
    gpu.copy_done(a.copy.unwrap()).unwrap();
    pin(&s, (0, 1));
    let Prefetch::Copied { slot, copy } = gpu.prefetch((0, 1), 2, 1, 0).unwrap() else {
        panic!("a free slot: the prefetch copies")
    };
    assert_eq!(gpu.state(slot).unwrap(), GpuSlotState::Copying);
    pin(&s, (0, 2));
    assert_eq!(
        gpu.prefetch((0, 2), 2, 1, 0).unwrap(),
        Prefetch::Busy,
        "one prefetch copy in flight at most"
    );
    gpu.copy_done(copy).unwrap();
    assert_eq!(gpu.state(slot).unwrap(), GpuSlotState::Prefetched);
    assert_eq!(
        s.pinned(),
        0,
        "the prefetch's RAM pin went with its copy, the refused one at once"
    );
    pin(&s, (0, 1));
    assert_eq!(gpu.prefetch((0, 1), 2, 1, 0).unwrap(), Prefetch::Held);
    // Demand evicts the older unprotected copy, not the guess.
    let b = acquire(&s, &gpu, (0, 2));
    assert_eq!(b.slot, a.slot);
    gpu.release(&[(0, 2)]).unwrap();
    gpu.copy_done(b.copy.unwrap()).unwrap();
    assert!(gpu.holds((0, 1)));
    gpu.demote(&[(0, 1)]);
    assert_eq!(gpu.state(slot).unwrap(), GpuSlotState::Ready);
    let c = acquire(&s, &gpu, (0, 3));
    assert_eq!(c.slot, slot, "the demoted guess goes first");
    assert!(gpu.holds((0, 2)) && !gpu.holds((0, 1)));
    gpu.release(&[(0, 3)]).unwrap();
    gpu.copy_done(c.copy.unwrap()).unwrap();
    let m = gpu.metrics();
    assert_eq!(
        (
            m.prefetch_copies,
            m.prefetch_demoted,
            m.prefetch_hits,
            m.prefetch_wasted
        ),
        (1, 1, 0, 0)
    );
    assert_eq!((m.hits, m.misses), (0, 3));
    assert_eq!(s.pinned(), 0);
}

#[test]
fn acquires_are_undone_newest_first_and_keep_their_ram_slot() {
    let d = tempfile::tempdir().unwrap();
    let (s, gpu) = open(d.path(), 4, 2);
    let a = acquire(&s, &gpu, (0, 6));
    gpu.copy_done(a.copy.unwrap()).unwrap();
    let ram = gpu.ram_slot((0, 6)).unwrap();
    assert_eq!(
        gpu.acquire_resident(&[(0, 5), (0, 6)], 2).unwrap(),
        vec![(1, a.slot)]
    );
    gpu.release(&[(0, 6)]).unwrap(); // the newest: the one without the RAM record
    assert_eq!(gpu.ram_slot((0, 6)), Some(ram));
    assert_eq!(s.pinned(), 1);
    let (slot, ram_slot, copy) = gpu.refresh((0, 6)).unwrap().unwrap();
    assert_eq!((slot, ram_slot), (a.slot, ram));
    gpu.release(&[(0, 6)]).unwrap();
    assert_eq!(gpu.ram_slot((0, 6)), None);
    assert_eq!(s.pinned(), 1, "the refresh copy holds the RAM record");
    gpu.copy_done(copy).unwrap();
    assert_eq!(s.pinned(), 0);
    assert!(gpu.refresh((0, 6)).is_err(), "not acquired");
    // Keys never acquired are plain RAM releases; an error for what holds no pin.
    pin(&s, (0, 7));
    assert_eq!(gpu.release(&[(0, 7), (0, 7)]).unwrap(), Vec::<usize>::new());
    assert!(gpu.release(&[(0, 7)]).is_err());
    // need_hit: the tier must hold the weights; nothing changes otherwise.
    let r = pin(&s, (0, 1));
    assert!(gpu.acquire((0, 1), r, true).is_err());
    assert_eq!(gpu.ram_slot((0, 1)), None);
    s.release(&[(0, 1)]).unwrap();
}

#[test]
fn without_slots_acquires_only_pin_ram() {
    let d = tempfile::tempdir().unwrap();
    let (s, gpu) = open(d.path(), 2, 0);
    let r = pin(&s, (0, 2));
    assert_eq!(gpu.acquire((0, 2), r, false).unwrap(), None);
    assert_eq!(gpu.ram_slot((0, 2)), Some(r));
    assert!(!gpu.holds((0, 2)) && !gpu.can_prefetch(1, 0));
    assert_eq!(gpu.refresh((0, 2)).unwrap(), None);
    gpu.release(&[(0, 2)]).unwrap();
    assert_eq!(s.pinned(), 0);
    pin(&s, (0, 3));
    assert_eq!(gpu.prefetch((0, 3), 1, 1, 0).unwrap(), Prefetch::Busy);
    assert_eq!(s.pinned(), 0);
    assert!(s.gpu_slots(1).is_err(), "one GPU tier per open store");
}
