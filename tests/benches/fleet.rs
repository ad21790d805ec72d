//! What a fleet costs to watch, through the real `dispatch-cloud serve`, loopback `.so`, SSH
//! and runners (release build, production probe timings):
//! 1. an idle `serve` holding 10,000 queued containers that cannot start (at quota);
//! 2. `serve` managing `FLEET_VMS` (default 1,000) busy loopback VMs, one long container each,
//!    in steady state: CPU share of one core and resident memory.
//!
//! Run: `cargo build --release --workspace && cargo bench -p system-tests --bench fleet`
//! (`FLEET_VMS=200` for a quicker look).

use std::time::{Duration, Instant};

use dispatch_cloud::queue::{ContainerState, NewContainer, RuntimeConstraints};
use system_tests::{cpu_seconds, rss_kib, HarnessOptions, ServeHarness};

const TYPES: &str = r#"
[[instance_types]]
name = "one"
provider_type = "lb.small"
vcpus = 1
ram = "2GiB"
price = 0.01
"#;

fn long_job() -> NewContainer {
    NewContainer {
        command: vec!["sleep".into(), "100000".into()],
        priority: 1,
        runtime_constraints: RuntimeConstraints {
            vcpus: 1,
            ram_bytes: 64 << 20,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// CPU share of one core and resident MiB of `pid` over `window`.
fn measure(pid: i32, window: Duration) -> (f64, f64) {
    let cpu = cpu_seconds(pid);
    std::thread::sleep(window);
    let share = (cpu_seconds(pid) - cpu) / window.as_secs_f64() * 100.0;
    let rss = rss_kib(pid).unwrap_or(0) as f64 / 1024.0;
    (share, rss)
}

fn production_like(max_instances: usize) -> HarnessOptions {
    HarnessOptions {
        cluster_extra: TYPES.into(),
        idle_seconds: 600.0,
        probe_interval_seconds: 10.0,
        sync_interval_seconds: 60.0,
        limits_extra: format!("max_instances = {max_instances}"),
        ..HarnessOptions::default()
    }
}

fn queued_at_quota() {
    let h = ServeHarness::start_opts(production_like(2));
    let client = h.client();
    for _ in 0..10 {
        client.submit_many(&vec![long_job(); 1000]).expect("submit");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while client
        .active()
        .map(|a| {
            a.iter()
                .filter(|c| c.state == ContainerState::Running)
                .count()
                < 2
        })
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "two containers never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let the creates, probes and streams settle before measuring.
    std::thread::sleep(Duration::from_secs(15));
    let pid = h.pid().expect("serve");
    let (cpu, rss) = measure(pid, Duration::from_secs(60));
    println!(
        "idle serve, 10,000 queued containers at quota (2 VMs busy): {cpu:.2} % of one core, {rss:.0} MiB resident"
    );
}

fn busy_fleet(vms: usize) {
    let h = ServeHarness::start_opts(production_like(vms + 10));
    let client = h.client();
    let began = Instant::now();
    for chunk in 0..vms.div_ceil(500) {
        let n = (vms - chunk * 500).min(500);
        client.submit_many(&vec![long_job(); n]).expect("submit");
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let running = client
            .active()
            .map(|a| {
                a.iter()
                    .filter(|c| c.state == ContainerState::Running)
                    .count()
            })
            .unwrap_or(0);
        if running == vms {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {running} of {vms} running after 30 min"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "{vms} busy VMs: all containers running after {:.0} s",
        began.elapsed().as_secs_f64()
    );
    // Past the first watched probes of every VM (60 s apart) before measuring.
    std::thread::sleep(Duration::from_secs(30));
    println!("measuring serve (pid {})", h.pid().unwrap_or(0));
    let pid = h.pid().expect("serve");
    let (cpu, rss) = measure(pid, Duration::from_secs(120));
    println!(
        "serve managing {vms} busy loopback VMs, steady state over 120 s: {cpu:.2} % of one core, {rss:.0} MiB resident ({:.1} KiB per VM)",
        rss * 1024.0 / vms as f64
    );
}

fn main() {
    let vms: usize = std::env::var("FLEET_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // FLEET_ONLY=busy skips the queued-at-quota part.
    if std::env::var("FLEET_ONLY").as_deref() != Ok("busy") {
        queued_at_quota();
    }
    busy_fleet(vms);
}
