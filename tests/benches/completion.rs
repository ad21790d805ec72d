//! Event-driven completion, through the real `dispatch-cloud serve`, loopback `.so`, SSH and
//! runners, on 8 warm 1-vCPU loopback VMs:
//! - exit → recorded Complete (the runner's end time to the host's record), p50/p99;
//! - submit → runner started, p50/p99;
//! - throughput of trivial containers (`true`) submitted in one request, and the host's CPU
//!   time per container.
//!
//! Run: `cargo build --release --workspace && cargo bench -p system-tests --bench completion`

use std::time::{Duration, Instant};

use dispatch_cloud::queue::{Container, ContainerState, NewContainer, RuntimeConstraints};
use system_tests::{cpu_seconds, HarnessOptions, ServeHarness};

const VMS: usize = 8;

const TYPES: &str = r#"
[[instance_types]]
name = "one"
provider_type = "lb.small"
vcpus = 1
ram = "2GiB"
price = 0.01
"#;

fn job(command: &str) -> NewContainer {
    NewContainer {
        command: vec!["sh".into(), "-c".into(), command.into()],
        priority: 1,
        runtime_constraints: RuntimeConstraints {
            vcpus: 1,
            ram_bytes: 64 << 20,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn percentile(sorted: &[i64], p: usize) -> i64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn main() {
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: TYPES.into(),
        idle_seconds: 600.0,
        // As in production: probes every 10 s, rarer still for VMs that stream their events.
        probe_interval_seconds: 10.0,
        sync_interval_seconds: 60.0,
        // Exactly the warm VMs: a queue of 1,000 would otherwise have more created.
        limits_extra: format!("max_instances = {VMS}"),
        ..HarnessOptions::default()
    });
    let client = h.client();
    let wait_final = |id: &str| -> Container {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let c = client.get(id).expect("get");
            if c.state.is_final() {
                return c;
            }
            assert!(Instant::now() < deadline, "{id} did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // Warm-up: boots the VMs that the measured containers then find idle.
    let warm = client
        .submit_many(&vec![job("sleep 2"); VMS])
        .expect("submit");
    for c in &warm {
        assert_eq!(wait_final(&c.id).state, ContainerState::Complete);
    }
    let booted = client.instances().expect("instances").len();
    assert_eq!(booted, VMS, "warm-up should leave {VMS} VMs");

    let mut exit_to_record = Vec::new();
    let mut submit_to_start = Vec::new();
    for _ in 0..200 {
        let c = client.submit(&job("true")).expect("submit");
        let done = wait_final(&c.id);
        assert_eq!(done.state, ContainerState::Complete, "{done:?}");
        let (Some(started), Some(finished), Some(recorded)) =
            (done.started_at_ms, done.finished_at_ms, done.recorded_at_ms)
        else {
            panic!("times missing: {done:?}");
        };
        exit_to_record.push(recorded - finished);
        submit_to_start.push(started - done.created_at_ms);
    }
    exit_to_record.sort();
    submit_to_start.sort();
    println!(
        "exit -> recorded Complete, {} containers on warm VMs: p50 {} ms, p99 {} ms, max {} ms",
        exit_to_record.len(),
        percentile(&exit_to_record, 50),
        percentile(&exit_to_record, 99),
        exit_to_record[exit_to_record.len() - 1]
    );
    println!(
        "submit -> runner started on an idle VM: p50 {} ms, p99 {} ms, max {} ms",
        percentile(&submit_to_start, 50),
        percentile(&submit_to_start, 99),
        submit_to_start[submit_to_start.len() - 1]
    );

    let pid = h.pid().expect("serve runs");
    for round in 0..2 {
        let n = 1000;
        let cpu_before = cpu_seconds(pid);
        let began = Instant::now();
        let batch = client
            .submit_many(&vec![job("true"); n])
            .expect("submit batch");
        loop {
            let active = client.active().expect("active");
            if active.is_empty() {
                break;
            }
            assert!(began.elapsed() < Duration::from_secs(600), "batch stuck");
            std::thread::sleep(Duration::from_millis(20));
        }
        let wall = began.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid) - cpu_before;
        let complete = batch
            .iter()
            .filter(|c| {
                client
                    .get(&c.id)
                    .is_ok_and(|c| c.state == ContainerState::Complete)
            })
            .count();
        assert_eq!(complete, n, "every container completes");
        println!(
            "round {round}: {n} `true` containers in one request through {VMS} warm 1-vCPU VMs: \
             {wall:.2} s = {:.1} containers/s; serve used {cpu:.2} s CPU = {:.2} ms per container",
            n as f64 / wall,
            cpu * 1000.0 / n as f64
        );
    }
}
