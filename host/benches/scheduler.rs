//! One scheduler pass over 100,000 queued containers and 10,000 instances, in memory.
//! Run with `cargo bench -p dispatch-cloud --bench scheduler`; prints min and median of 10 passes.

use std::time::{Duration, Instant};

use dispatch_cloud::queue::{Container, ContainerState, RuntimeConstraints};
use dispatch_cloud::scheduler::status::Pressure;
use dispatch_cloud::scheduler::{
    plan, queue_view, PlanInput, RunnerSeen, SlotId, WorkerSlot, WorkerStatus,
};
use driver_abi::InstanceType;

const GIB: u64 = 1 << 30;

fn container(i: usize, state: ContainerState) -> Container {
    Container {
        id: format!("zzzzz-dz642-{i:015}"),
        state,
        priority: 1 + (i % 100) as i64,
        command: vec!["true".into()],
        env: Default::default(),
        working_dir: None,
        image: None,
        runtime_constraints: RuntimeConstraints {
            vcpus: [1, 1, 2, 4][i % 4],
            ram_bytes: [1, 2, 4, 8][i % 4] * GIB,
            ..Default::default()
        },
        lock_count: 0,
        dispatch_attempts: 0,
        instance_type: None,
        instance_id: None,
        seq: i as i64,
        created_at_ms: 0,
        started_at_ms: None,
        finished_at_ms: None,
        recorded_at_ms: None,
        exit_code: None,
        runtime_error: None,
        log_dir: None,
        cost: None,
        scheduling_status: None,
    }
}

fn scenario(at_quota: bool) -> Duration {
    let types: Vec<InstanceType> = [
        ("small", 2, 4, 0.02),
        ("medium", 4, 8, 0.04),
        ("large", 8, 16, 0.08),
        ("xlarge", 16, 64, 0.16),
    ]
    .iter()
    .map(|(n, v, r, p)| InstanceType {
        vcpus: *v,
        ram_bytes: r * GIB,
        price: *p,
        ..InstanceType::minimal(n)
    })
    .collect();
    let mut containers = Vec::new();
    let mut runners = rustc_hash::FxHashMap::default();
    let mut workers = Vec::new();
    for i in 0..10_000 {
        let id = format!("i-{i:06}");
        let c = container(1_000_000 + i, ContainerState::Running);
        runners.insert(c.id.clone(), RunnerSeen::Running { worker: id.clone() });
        containers.push(c);
        workers.push(WorkerSlot {
            id: SlotId::Instance(id),
            type_name: Some(types[i % 4].name.clone()),
            status: WorkerStatus::Running,
            accepts_work: true,
            foreign_runners: false,
            probed: true,
        });
    }
    for i in 0..100_000 {
        containers.push(container(
            i,
            if i % 10 == 0 {
                ContainerState::Locked
            } else {
                ContainerState::Queued
            },
        ));
    }
    let at_capacity = rustc_hash::FxHashSet::default();
    let input = PlanInput {
        containers: &containers,
        workers: &workers,
        runners: &runners,
        types: &types,
        maximum_price_factor: 1.5,
        max_per_instance: 0,
        quota_headroom: if at_quota { 0 } else { usize::MAX },
        at_capacity: &at_capacity,
        creates_allowed: usize::MAX,
        spend_left: f64::INFINITY,
        pool_recovered: true,
        listings_settled: true,
    };
    let mut times = Vec::new();
    let mut actions = 0;
    for _ in 0..10 {
        let t = Instant::now();
        actions = std::hint::black_box(plan(&input)).len();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "scheduler pass, 100,000 queued + 10,000 instances, at_quota={at_quota}: min {:.1?}, median {:.1?} ({actions} actions)",
        times[0], times[5]
    );
    // What the dispatcher publishes for the API after each pass.
    let acts = plan(&input);
    let pressure = Pressure {
        types: &types,
        maximum_price_factor: 1.5,
        quota_headroom: input.quota_headroom,
        creates_allowed: usize::MAX,
        spend_left: f64::INFINITY,
        at_capacity: &|_| false,
        create_trouble: &|_| None,
    };
    let mut view_times = Vec::new();
    let mut entries = 0;
    for _ in 0..10 {
        let t = Instant::now();
        entries = std::hint::black_box(queue_view(&input, &acts, &pressure, &|_| 0)).len();
        view_times.push(t.elapsed());
    }
    view_times.sort();
    println!(
        "queue view after it ({entries} entries): min {:.1?}, median {:.1?}",
        view_times[0], view_times[5]
    );
    times[5]
}

fn main() {
    scenario(true);
    scenario(false);
}
