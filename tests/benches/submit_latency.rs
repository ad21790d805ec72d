//! Submit → runner started on an already-idle loopback VM, over 200 submissions, through the
//! real `dispatch-cloud serve`, loopback `.so` and SSH. Prints p50 and p99.
//!
//! Run: `cargo build --release --workspace && cargo bench -p system-tests --bench submit_latency`

use std::time::{Duration, Instant};

use dispatch_cloud::queue::{ContainerState, NewContainer, RuntimeConstraints};
use system_tests::ServeHarness;

fn main() {
    let h = ServeHarness::start_full("", "", false, 600.0);
    let client = h.client();
    let new = NewContainer {
        command: vec!["true".into()],
        priority: 1,
        runtime_constraints: RuntimeConstraints {
            vcpus: 1,
            ram_bytes: 64 << 20,
            ..Default::default()
        },
        ..Default::default()
    };
    let wait_final = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let c = client.get(id).expect("get");
            if c.state.is_final() {
                return c;
            }
            assert!(Instant::now() < deadline, "{id} did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // Warm-up: boots the VM that every measured submission then finds idle.
    let warm = client.submit(&new).expect("submit");
    assert_eq!(wait_final(&warm.id).state, ContainerState::Complete);
    std::thread::sleep(Duration::from_millis(500));
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let c = client.submit(&new).expect("submit");
        let done = wait_final(&c.id);
        let started = done.started_at_ms.expect("started");
        latencies.push(started - done.created_at_ms);
        // Let the VM report itself idle again, as in "an already-idle VM".
        std::thread::sleep(Duration::from_millis(150));
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "submit -> runner started on an idle loopback VM, {} submissions: p50 {} ms, p99 {} ms, max {} ms",
        latencies.len(),
        pct(50),
        pct(99),
        latencies[latencies.len() - 1]
    );
}
