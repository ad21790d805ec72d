//! The chaos run: N containers of mixed sizes, lengths and exit codes through `serve` on the
//! loopback cloud with every fault on (10 % failing creates and destroys, create rate limits,
//! a quota, one type at capacity, 5 % of VMs crashing, 5 % turning broken) and two `kill -9`
//! of `serve` at random moments. It then checks that every container ended once, Complete,
//! with its own exit code, ran no more often than its recorded attempts allow, and that no VM
//! is left once the idle timeout has passed.
//!
//! `cargo run -p system-tests --bin chaos -- --containers 1000 [--seed S]` (after
//! `cargo build --workspace`); `tests/tests/chaos.rs` runs a small N in the test suite.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use dispatch_cloud::queue::{ContainerState, NewContainer, RuntimeConstraints};

use crate::{loopback_set, HarnessOptions, ServeHarness, THREE_TYPES};

/// `lb.medium` is at capacity for the whole run (3-vCPU containers then take `large`).
const FAULTS: &str = "[instance_sets.parameters.faults]
create_error_rate = 0.1
destroy_error_rate = 0.1
create_rate_limit_ms = 100
max_instances = 8
capacity_error_types = [\"lb.medium\"]
crash_after_ms = 1500
crash_rate = 0.05
broken_after_ms = 2500
broken_rate = 0.05
";

pub struct ChaosOptions {
    pub containers: usize,
    /// Makes sizes, lengths, exit codes and the kill moments repeatable.
    pub seed: u64,
}

#[derive(Debug)]
pub struct ChaosReport {
    pub containers: usize,
    pub wall: Duration,
    /// From the first submission to the last container's end.
    pub to_last_end: Duration,
    /// CPU time of the `serve` processes (user + system), all three lives.
    pub serve_cpu: Duration,
    /// Containers that ran more than once (each extra run is a recorded dispatch attempt).
    pub reruns: usize,
    pub dispatch_attempts: u32,
    /// The faults that showed in serve's log, of those looked for.
    pub faults_seen: Vec<&'static str>,
    /// VMs given up because they stopped answering (crashed) or flagged themselves broken.
    pub vms_lost: usize,
}

impl ChaosReport {
    pub fn containers_per_second(&self) -> f64 {
        self.containers as f64 / self.to_last_end.as_secs_f64().max(1e-9)
    }
}

/// xorshift64*: repeatable, and no dependency for a few thousand draws.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// CPU time of the children this process has waited for.
fn reaped_children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

pub fn run(opts: &ChaosOptions) -> ChaosReport {
    let started = Instant::now();
    let cpu_before = reaped_children_cpu();
    let mut h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: THREE_TYPES.into(),
        loopback_extra: FAULTS.into(),
        idle_seconds: 2.0,
        ..HarnessOptions::default()
    });
    let mut draw = Draw(opts.seed.max(1));
    let runs = h.dir.path().join("runs.log").display().to_string();
    // What each container must end with, by tag.
    let mut expected: BTreeMap<String, i32> = BTreeMap::new();
    let batch: Vec<NewContainer> = (0..opts.containers)
        .map(|i| {
            let tag = format!("c{i}");
            let code = [0, 0, 0, 1, 3, 42][draw.below(6) as usize];
            let tenths = 2 + draw.below(18);
            let (vcpus, ram) =
                [(1, 256u64), (1, 512), (2, 1024), (3, 2048)][draw.below(4) as usize];
            expected.insert(tag.clone(), code);
            let mut env = BTreeMap::new();
            env.insert("TAG".to_string(), tag);
            env.insert("RUNS".to_string(), runs.clone());
            NewContainer {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!(
                        "echo \"$TAG\" >> \"$RUNS\"; sleep {}.{}; echo \"$TAG\"; exit {code}",
                        tenths / 10,
                        tenths % 10
                    ),
                ],
                env,
                priority: 1 + draw.below(3) as i64,
                runtime_constraints: RuntimeConstraints {
                    vcpus,
                    ram_bytes: ram << 20,
                    ..Default::default()
                },
                ..Default::default()
            }
        })
        .collect();
    let submitted_at = Instant::now();
    let mut ids: Vec<(String, String)> = Vec::new();
    for chunk in batch.chunks(200) {
        let made = h.client().submit_many(chunk).expect("submit a batch");
        for c in made {
            let tag = c.env.get("TAG").cloned().unwrap_or_default();
            ids.push((c.id, tag));
        }
    }
    // Two kill -9 of serve, when a random share of the batch has ended (the first in the
    // first half, the second in the second).
    let kill_at = [
        opts.containers * (10 + draw.below(35) as usize) / 100,
        opts.containers * (55 + draw.below(35) as usize) / 100,
    ];
    let deadline = Duration::from_secs(120 + opts.containers as u64 / 2);
    let finished = |h: &ServeHarness| -> usize {
        h.client()
            .list()
            .map(|l| l.iter().filter(|c| c.state.is_final()).count())
            .unwrap_or(0)
    };
    for at in kill_at {
        h.wait_for(
            &format!("{at} containers to end before a kill -9"),
            deadline,
            || finished(&h) >= at,
        );
        h.kill();
        h.spawn();
    }
    h.wait_for("every container to end", deadline, || {
        finished(&h) >= opts.containers
    });
    let to_last_end = submitted_at.elapsed();

    // Every container ended Complete with its own exit code, and ran no more often than its
    // recorded dispatch attempts allow.
    let mut run_counts: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(&runs).unwrap_or_default().lines() {
        *run_counts.entry(line.to_string()).or_default() += 1;
    }
    let by_id: HashMap<String, dispatch_cloud::queue::Container> = h
        .client()
        .list()
        .expect("list")
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    // Recorded once: across serve's three lives, one `to=Complete` line per container.
    let log_before_stop = h.log();
    let mut completions: HashMap<&str, usize> = HashMap::new();
    for line in log_before_stop
        .lines()
        .filter(|l| l.contains(" to=Complete"))
    {
        if let Some(id) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("container="))
        {
            *completions.entry(id).or_default() += 1;
        }
    }
    let mut reruns = 0;
    let mut attempts = 0;
    for (id, tag) in &ids {
        let c = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id} ({tag}) is gone"));
        assert_eq!(c.state, ContainerState::Complete, "{tag}: {c:?}");
        assert_eq!(c.exit_code, Some(expected[tag]), "{tag}: {c:?}");
        assert_ne!(
            c.instance_type.as_deref(),
            Some("medium"),
            "a type at capacity ran {tag}"
        );
        assert_eq!(
            completions.get(id.as_str()).copied(),
            Some(1),
            "{tag} was recorded Complete more or less than once"
        );
        let ran = run_counts.get(tag).copied().unwrap_or(0);
        assert!(ran >= 1, "{tag} never ran: {c:?}");
        assert!(
            ran <= 1 + c.dispatch_attempts as usize,
            "{tag} ran {ran} times with {} attempts recorded: {c:?}",
            c.dispatch_attempts
        );
        let out = h.client().logs(id, "stdout").expect("stdout");
        assert_eq!(
            String::from_utf8_lossy(&out).trim(),
            tag.as_str(),
            "{tag}'s log"
        );
        reruns += usize::from(ran > 1);
        attempts += c.dispatch_attempts;
    }
    // No VM is left once the idle timeout has passed.
    let (_p, _e, set) = loopback_set(&h.cloud, "zzzzz-zzzzz-servetest000000", "");
    h.wait_for("every VM to be gone", Duration::from_secs(120), || {
        h.client().instances().is_ok_and(|l| l.is_empty())
            && set
                .instances(&Default::default())
                .is_ok_and(|l| l.is_empty())
    });
    h.terminate(Duration::from_secs(30));
    let log = h.log();
    let faults_seen = [
        "quota exceeded",
        "no capacity",
        "rate limited",
        "broken",
        "probe timeout",
    ]
    .into_iter()
    .filter(|f| log.contains(f))
    .collect();
    let vms_lost = log
        .lines()
        .filter(|l| {
            l.contains("to=Shutdown") && (l.contains("probe timeout") || l.contains("broken"))
        })
        .count();
    ChaosReport {
        containers: opts.containers,
        wall: started.elapsed(),
        to_last_end,
        serve_cpu: reaped_children_cpu().saturating_sub(cpu_before),
        reruns,
        dispatch_attempts: attempts,
        faults_seen,
        vms_lost,
    }
}
