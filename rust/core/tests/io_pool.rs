//! The I/O pool's scheduling: reads and writes both make progress; one kind alone keeps heap order.
use gmtier_core::store::io::{IoPool, JobPriority};
use std::sync::{Arc, Condvar, Mutex};

/// Jobs that record the order they start in and block until their gate opens.
#[derive(Default)]
struct Log {
    started: Vec<String>,
    finished: usize,
    open: Vec<bool>,
}

#[derive(Clone, Default)]
struct Rig(Arc<(Mutex<Log>, Condvar)>);

impl Rig {
    /// A gate, closed.
    fn gate(&self) -> usize {
        let mut g = self.0 .0.lock().unwrap();
        g.open.push(false);
        g.open.len() - 1
    }
    fn open(&self, gate: usize) {
        self.0 .0.lock().unwrap().open[gate] = true;
        self.0 .1.notify_all();
    }
    /// Opens every gate when dropped: declared after the pool, it is dropped before it, so a
    /// failed assertion ends the test instead of the pool's drop waiting for blocked jobs.
    fn open_all_on_drop(&self) -> OpenAllOnDrop {
        OpenAllOnDrop(self.clone())
    }
    /// Submit a job named `name` that waits for `gate` once started.
    fn submit(&self, pool: &IoPool, class: u8, priority: i64, seq: u64, name: &str, gate: usize) {
        let (rig, name) = (self.clone(), name.to_string());
        pool.submit(
            JobPriority {
                class,
                priority,
                seq,
            },
            Box::new(move || {
                let (m, cv) = &*rig.0;
                let mut g = m.lock().unwrap();
                g.started.push(name);
                cv.notify_all();
                while !g.open[gate] {
                    g = cv.wait(g).unwrap();
                }
                g.finished += 1;
                cv.notify_all();
            }),
        );
    }
    /// Wait until `n` jobs started (or finished, with `finished`), then the start order.
    fn wait_started(&self, n: usize) -> Vec<String> {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap();
        while g.started.len() < n {
            g = cv.wait(g).unwrap();
        }
        g.started.clone()
    }
    fn wait_finished(&self, n: usize) {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap();
        while g.finished < n {
            g = cv.wait(g).unwrap();
        }
    }
}

struct OpenAllOnDrop(Rig);

impl Drop for OpenAllOnDrop {
    fn drop(&mut self) {
        let (m, cv) = &*self.0 .0;
        // A panicking job may have poisoned the lock; the gates must open all the same.
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        g.open.iter_mut().for_each(|o| *o = true);
        cv.notify_all();
    }
}

/// Occupy every worker of `pool` (threads) with jobs waiting on a gate; returns the gate.
fn hold(rig: &Rig, pool: &IoPool, threads: usize) -> usize {
    let g = rig.gate();
    for i in 0..threads {
        rig.submit(pool, JobPriority::DEMAND, 100, i as u64, "hold", g);
    }
    rig.wait_started(threads);
    g
}

const W: u8 = JobPriority::WRITE;
const R: u8 = JobPriority::DEMAND;

fn kinds(names: &[String]) -> (usize, usize) {
    let w = names.iter().filter(|n| n.starts_with('w')).count();
    let r = names.iter().filter(|n| n.starts_with('r')).count();
    (w, r)
}

#[test]
fn reads_run_while_writes_are_queued_and_the_other_way() {
    let n = 4;
    for writes_first in [true, false] {
        let (rig, pool) = (Rig::default(), IoPool::new(n));
        let _gates = rig.open_all_on_drop();
        let h = hold(&rig, &pool, n);
        let jobs = rig.gate();
        let mut seq = 0;
        let mut queue = |kind: u8| {
            for i in 0..8 {
                let name = format!("{}{i}", if kind == W { 'w' } else { 'r' });
                rig.submit(&pool, kind, 0, seq, &name, jobs);
                seq += 1;
            }
        };
        if writes_first {
            queue(W);
            queue(R);
        } else {
            queue(R);
            queue(W);
        }
        rig.open(h);
        // Every worker takes a job and blocks in it: half write, half read, 12 stay queued.
        let started = rig.wait_started(2 * n);
        assert_eq!(
            kinds(&started[n..]),
            (n / 2, n / 2),
            "writes_first={writes_first}: {started:?}"
        );
        // In queue order within each kind.
        let mut w: Vec<_> = started[n..].iter().filter(|s| s.starts_with('w')).collect();
        w.sort();
        assert_eq!(w, ["w0", "w1"]);
        rig.open(jobs);
        rig.wait_finished(n + 16);
    }
}

#[test]
fn one_kind_alone_keeps_heap_order_and_urgent_writes_go_first() {
    // One worker, held while the queue fills, then every job runs at once: the start order is
    // the pick order.
    for kind in [W, JobPriority::PREFETCH] {
        let (rig, pool) = (Rig::default(), IoPool::new(1));
        let _gates = rig.open_all_on_drop();
        let h = hold(&rig, &pool, 1);
        let go = rig.gate();
        rig.open(go);
        let c = if kind == W { 'w' } else { 'r' };
        rig.submit(&pool, kind, 0, 0, &format!("{c}-a"), go);
        rig.submit(&pool, kind, 5, 1, &format!("{c}-b"), go);
        rig.submit(&pool, kind, 0, 2, &format!("{c}-c"), go);
        // A higher class: urgent write-back over write-backs, demand read over prefetches.
        let top = if kind == W {
            JobPriority::URGENT_WRITE
        } else {
            R
        };
        rig.submit(&pool, top, 0, 3, &format!("{c}-d"), go);
        rig.open(h);
        let started = rig.wait_started(5);
        let want: Vec<String> = ["d", "b", "a", "c"]
            .iter()
            .map(|x| format!("{c}-{x}"))
            .collect();
        assert_eq!(started[1..], want[..]);
    }
    // Both kinds on one worker: they alternate; an urgent write-back still runs first.
    let (rig, pool) = (Rig::default(), IoPool::new(1));
    let _gates = rig.open_all_on_drop();
    let h = hold(&rig, &pool, 1);
    let go = rig.gate();
    rig.open(go);
    for i in 0..3 {
        rig.submit(&pool, W, 0, i, &format!("w{i}"), go);
        rig.submit(&pool, R, 0, 10 + i, &format!("r{i}"), go);
    }
    rig.submit(&pool, JobPriority::URGENT_WRITE, 0, 20, "wu", go);
    rig.open(h);
    let started = rig.wait_started(8);
    assert_eq!(
        started[1..],
        ["wu", "r0", "w0", "r1", "w1", "r2", "w2"].map(String::from)
    );
}

#[test]
fn urgent_writes_take_any_free_worker() {
    let n = 4;
    let (rig, pool) = (Rig::default(), IoPool::new(n));
    let _gates = rig.open_all_on_drop();
    let h = hold(&rig, &pool, n);
    let jobs = rig.gate();
    for i in 0..4 {
        rig.submit(
            &pool,
            JobPriority::URGENT_WRITE,
            0,
            i,
            &format!("u{i}"),
            jobs,
        );
        rig.submit(&pool, R, 0, 10 + i, &format!("r{i}"), jobs);
    }
    rig.open(h);
    // Four workers take the four urgent writes (in whichever order their threads log them).
    let mut started = rig.wait_started(2 * n)[n..].to_vec();
    started.sort();
    assert_eq!(started, ["u0", "u1", "u2", "u3"].map(String::from));
    rig.open(jobs);
    rig.wait_finished(3 * n);
}

#[test]
fn taking_turns_never_runs_reads_and_writes_at_once() {
    let (n, turn) = (4, 3);
    let (rig, pool) = (Rig::default(), IoPool::new(n));
    let _gates = rig.open_all_on_drop();
    pool.set_turns(Some(turn), 0);
    let h = hold(&rig, &pool, n);
    // (reads running, writes running, whether both ever ran at once), and the start order.
    let running = Arc::new(Mutex::new((0usize, 0usize, false)));
    let order = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new((Mutex::new(0usize), Condvar::new()));
    for i in 0..24u64 {
        let write = i % 2 == 0;
        let (running, order, done) = (running.clone(), order.clone(), done.clone());
        let class = if write { W } else { R };
        let prio = JobPriority {
            class,
            priority: 0,
            seq: i,
        };
        pool.submit(
            prio,
            Box::new(move || {
                {
                    let mut r = running.lock().unwrap();
                    if write {
                        r.1 += 1
                    } else {
                        r.0 += 1
                    }
                    r.2 |= r.0 > 0 && r.1 > 0;
                    order.lock().unwrap().push(write);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
                {
                    let mut r = running.lock().unwrap();
                    if write {
                        r.1 -= 1
                    } else {
                        r.0 -= 1
                    }
                }
                *done.0.lock().unwrap() += 1;
                done.1.notify_all();
            }),
        );
    }
    rig.open(h);
    let mut d = done.0.lock().unwrap();
    while *d < 24 {
        d = done.1.wait(d).unwrap();
    }
    drop(d);
    assert!(!running.lock().unwrap().2, "a read and a write ran at once");
    // Both kinds stay queued to the end (12 each), so every turn but the last is `turn` jobs.
    let order = order.lock().unwrap().clone();
    let mut turns = vec![1usize];
    for w in order.windows(2) {
        if w[0] == w[1] {
            *turns.last_mut().unwrap() += 1;
        } else {
            turns.push(1);
        }
    }
    assert!(turns.iter().all(|&t| t <= turn), "turns {turns:?}");
    assert!(turns.len() >= 24 / turn, "turns {turns:?}");
    // Turns off again: half the workers write while reads are queued.
    let (rig, pool) = (Rig::default(), IoPool::new(n));
    let _gates = rig.open_all_on_drop();
    pool.set_turns(Some(turn), 0);
    pool.set_turns(None, 0);
    let h = hold(&rig, &pool, n);
    let jobs = rig.gate();
    for i in 0..8 {
        let kind = if i % 2 == 0 { W } else { R };
        let name = format!("{}{i}", if kind == W { 'w' } else { 'r' });
        rig.submit(&pool, kind, 0, 100 + i, &name, jobs);
    }
    rig.open(h);
    let started = rig.wait_started(2 * n);
    assert_eq!(kinds(&started[n..]), (n / 2, n / 2), "{started:?}");
    rig.open(jobs);
    rig.wait_finished(2 * n);
}
