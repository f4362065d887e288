//! The store lock across processes: a child process of this test binary holds a store open.
//! A test binary of its own, so no other test's stores are open while it spawns the child.
mod common;
use common::{content, schema};
use gmtier_core::store::{ExpertStore, StoreOptions, LOCK_FILE};
use std::io::BufRead;

const HOLDER_ENV: &str = "GMTIER_LOCK_HOLDER";

fn opts() -> StoreOptions {
    StoreOptions {
        ram_bytes: 1 << 20,
        io_threads: 2,
        queue_depth: 4,
        direct: true,
        chunk_bytes: 8192,
        turn_bytes: 0,
    }
}

#[test]
fn another_process_is_refused_and_a_dead_holder_leaves_no_lock() {
    if let Some(dir) = std::env::var_os(HOLDER_ENV) {
        // The child: hold the store open until killed.
        let _s = ExpertStore::open(std::path::Path::new(&dir), opts()).unwrap();
        println!("holding");
        std::thread::sleep(std::time::Duration::from_secs(60));
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut init = |l: usize, e: usize, b: &mut [u8]| {
        b.copy_from_slice(&content(l, e, 0, b.len()));
        Ok(())
    };
    ExpertStore::create(d.path(), 1, 3, &schema(), None, Some(&mut init)).unwrap();
    let mut holder = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "another_process_is_refused_and_a_dead_holder_leaves_no_lock",
            "--nocapture",
        ])
        .env(HOLDER_ENV, d.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let holding = out.lines().map_while(|l| l.ok()).any(|l| l == "holding");
    assert!(holding, "the child never opened the store");
    let msg = match ExpertStore::open(d.path(), opts()) {
        Ok(_) => panic!("open of a store another process holds should fail"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(&format!("process {}", holder.id())), "{msg}");
    assert!(msg.contains(&d.path().display().to_string()), "{msg}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The holder died without closing: its lock went with it, the stale file is harmless.
    assert!(d.path().join(LOCK_FILE).exists());
    let s = ExpertStore::open(d.path(), opts()).unwrap();
    let rb = s.layout().record_bytes;
    assert_eq!(s.read_record(0, 1).unwrap(), content(0, 1, 0, rb));
}

#[test]
fn a_reopen_waits_for_a_fork_that_shares_the_closed_lock() {
    let d = tempfile::tempdir().unwrap();
    ExpertStore::create(d.path(), 1, 2, &schema(), None, None).unwrap();
    let s = ExpertStore::open(d.path(), opts()).unwrap();
    // A child forked while the store is open shares its lock until it exits (here after 200 ms,
    // as a fork + exec would at its exec).
    let child = unsafe { libc::fork() };
    if child == 0 {
        unsafe {
            libc::usleep(200_000);
            libc::_exit(0);
        }
    }
    assert!(child > 0, "fork failed");
    s.close();
    let t0 = std::time::Instant::now();
    let again = ExpertStore::open(d.path(), opts()).unwrap();
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(100),
        "the child held it"
    );
    drop(again);
    let mut status = 0;
    unsafe { libc::waitpid(child, &mut status, 0) };
}
