//! Helpers shared by the store tests: the test record schema and deterministic record bytes.
#![allow(dead_code)]
use gmtier_core::store::format::TensorSpec;

/// Two bf16 weight tensors (one spelled "bfloat16", to exercise the alias) and a state section.
pub fn schema() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w1", "bf16", &[32, 64], "weights").unwrap(),
        TensorSpec::new("w2", "bfloat16", &[64, 32], "weights").unwrap(),
        TensorSpec::new("w1.master", "f32", &[32, 64], "state").unwrap(),
        TensorSpec::new("step", "i64", &[1], "state").unwrap(),
    ]
}

/// Deterministic pseudo-random record content for (layer, expert, version).
pub fn content(l: usize, e: usize, v: u64, n: usize) -> Vec<u8> {
    let mut x = (l as u64 * 1_000_003 + e as u64 * 7919 + v * 104_729) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Poll until `f` holds (write-behind and prefetches finish asynchronously); fails after 10 s.
pub fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed().as_secs() < 10, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Run this test binary's test `test` as a child process with `env` set (the child's branch of
/// the test does the work in a loop), SIGKILL it after 150, 220 and 290 ms, and call
/// `after_kill(round)` after each kill.
pub fn kill_child_repeatedly(test: &str, env: &[(&str, String)], mut after_kill: impl FnMut(u64)) {
    for round in 0..3u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.args(["--exact", test, "--nocapture"]);
        for (k, v) in env {
            child.env(k, v);
        }
        let mut child = child.stdout(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + 70 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        after_kill(round);
    }
}
