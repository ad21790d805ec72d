//! Event-driven completion through the real `serve`, loopback `.so`, SSH and runner: a
//! container's end is acted on when the runner's event stream reports it, not at the next probe;
//! lost streams, crashes and huge logs lose nothing and cost the host no memory.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use dispatch_cloud::queue::{Container, ContainerState, NewContainer, RuntimeConstraints};
use system_tests::*;

const TYPES: &str = r#"
[[instance_types]]
name = "small"
provider_type = "lb.small"
vcpus = 4
ram = "4GiB"
price = 0.02
"#;

fn shell(body: &str) -> NewContainer {
    NewContainer {
        command: vec!["sh".into(), "-c".into(), body.into()],
        env: BTreeMap::new(),
        working_dir: None,
        image: None,
        priority: 1,
        runtime_constraints: RuntimeConstraints {
            vcpus: 1,
            ram_bytes: 64 << 20,
            ..RuntimeConstraints::default()
        },
    }
}

/// Probes every 60 s: only the event stream can make these tests pass in time.
fn rare_probes() -> HarnessOptions {
    HarnessOptions {
        cluster_extra: TYPES.into(),
        probe_interval_seconds: 60.0,
        idle_seconds: 30.0,
        ..HarnessOptions::default()
    }
}

fn get(h: &ServeHarness, id: &str) -> Option<Container> {
    h.client().get(id).ok()
}

fn final_container(h: &ServeHarness, id: &str, within: Duration) -> Container {
    h.wait_for(&format!("{id} to end"), within, || {
        get(h, id).is_some_and(|c| c.state.is_final())
    });
    get(h, id).expect("container")
}

/// Lines the containers appended to `runs.log` (outside every VM): a second run would show.
fn run_counts(h: &ServeHarness) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let text = std::fs::read_to_string(h.dir.path().join("runs.log")).unwrap_or_default();
    for line in text.lines() {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    counts
}

fn counted(h: &ServeHarness, tag: &str, body: &str) -> NewContainer {
    let runs = h.dir.path().join("runs.log");
    shell(&format!("echo {tag} >> '{}'; {body}", runs.display()))
}

#[test]
fn an_exit_is_recorded_at_once_with_the_vms_own_times() {
    let h = ServeHarness::start_opts(rare_probes());
    let c = h
        .client()
        .submit(&shell("sleep 1; exit 7"))
        .expect("submit");
    // Creating and booting the VM is part of this; the next 60 s probe is not.
    let done = final_container(&h, &c.id, Duration::from_secs(10));
    assert_eq!(done.state, ContainerState::Complete, "{done:?}");
    assert_eq!(done.exit_code, Some(7));
    let (Some(started), Some(finished)) = (done.started_at_ms, done.finished_at_ms) else {
        panic!("no run times: {done:?}");
    };
    let ran = finished - started;
    assert!(
        (1_000..1_500).contains(&ran),
        "recorded run time {ran} ms for `sleep 1`"
    );
    // It printed nothing: no log files, and the API serves empty logs.
    assert_eq!(h.client().logs(&c.id, "stdout").expect("stdout"), b"");
    assert_eq!(h.client().logs(&c.id, "stderr").expect("stderr"), b"");
}

#[test]
fn cut_event_streams_lose_no_result_and_run_nothing_twice() {
    let h = ServeHarness::start_opts(rare_probes());
    let mut ids = HashMap::new();
    for i in 0..8 {
        let c = h
            .client()
            .submit(&counted(
                &h,
                &format!("s{i}"),
                &format!("sleep 2; exit {i}"),
            ))
            .expect("submit");
        ids.insert(c.id, i);
    }
    h.wait_for("containers to run", Duration::from_secs(20), || {
        h.client().list().is_ok_and(|l| {
            l.iter()
                .filter(|c| c.state == ContainerState::Running)
                .count()
                >= 4
        })
    });
    // Every VM's SSH server, and with it every event stream, goes down; the runners do not.
    // The plugin starts the daemon again at the next cloud call.
    h.cloud.stop_daemon();
    for (id, code) in &ids {
        let c = final_container(&h, id, Duration::from_secs(40));
        assert_eq!(c.state, ContainerState::Complete, "{c:?}");
        assert_eq!(c.exit_code, Some(*code), "{c:?}");
    }
    let counts = run_counts(&h);
    for i in 0..8 {
        assert_eq!(counts.get(&format!("s{i}")), Some(&1), "{counts:?}");
    }
}

#[test]
fn kill_9_during_a_burst_of_short_containers_ends_each_once() {
    let mut h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: TYPES.into(),
        ..HarnessOptions::default()
    });
    let batch: Vec<NewContainer> = (0..60)
        .map(|i| counted(&h, &format!("b{i}"), &format!("exit {}", i % 3)))
        .collect();
    let made = h.client().submit_many(&batch).expect("submit");
    h.wait_for("some to finish", Duration::from_secs(30), || {
        h.client().list().is_ok_and(|l| {
            l.iter()
                .filter(|c| c.state == ContainerState::Complete)
                .count()
                >= 5
        })
    });
    h.kill();
    h.spawn();
    for (i, c) in made.iter().enumerate() {
        let done = final_container(&h, &c.id, Duration::from_secs(60));
        assert_eq!(done.state, ContainerState::Complete, "{done:?}");
        assert_eq!(done.exit_code, Some((i % 3) as i32), "{done:?}");
    }
    let counts = run_counts(&h);
    for i in 0..60 {
        assert_eq!(counts.get(&format!("b{i}")), Some(&1), "b{i}: {counts:?}");
    }
}

#[test]
fn a_huge_log_is_truncated_and_streamed_without_growing_serve() {
    const CAP: u64 = 120 << 20;
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: TYPES.into(),
        limits_extra: format!("max_log_bytes = {CAP}"),
        ..HarnessOptions::default()
    });
    let c = h
        .client()
        .submit(&shell("head -c 300000000 /dev/zero; echo bye >&2"))
        .expect("submit");
    let done = final_container(&h, &c.id, Duration::from_secs(120));
    assert_eq!(done.state, ContainerState::Complete, "{done:?}");
    let dir = std::path::PathBuf::from(done.log_dir.expect("log dir"));
    let stdout = std::fs::metadata(dir.join("stdout")).expect("stdout").len();
    assert!(
        stdout > CAP && stdout < CAP + 200,
        "stdout is {stdout} bytes"
    );
    let mut tail = std::fs::read(dir.join("stdout")).expect("read");
    let tail = String::from_utf8_lossy(&tail.split_off(CAP as usize)).into_owned();
    assert!(
        tail.contains("stdout truncated: the first 125829120 of 300000000 bytes"),
        "{tail:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("stderr")).expect("stderr"),
        "bye\n"
    );
    // Served as a stream too.
    let fetched = h.client().logs(&c.id, "stdout").expect("logs");
    assert_eq!(fetched.len() as u64, stdout);
    let pid = h.pid().expect("serve runs");
    let peak = peak_rss_kib(pid).expect("VmHWM");
    assert!(
        peak < 100 * 1024,
        "serve peaked at {peak} KiB while collecting and serving a 120 MiB log"
    );
}

#[test]
fn submit_count_makes_one_batch_and_each_copy_sees_its_index() {
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: TYPES.into(),
        ..HarnessOptions::default()
    });
    let config = h.config_file().display().to_string();
    let out = cli(&[
        "submit",
        "--config",
        &config,
        "--count",
        "100",
        "--ram",
        "64MiB",
        "--",
        "sh",
        "-c",
        "echo index=$DISPATCH_CLOUD_INDEX",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ids: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(ids.len(), 100);
    let mut created = std::collections::HashSet::new();
    let mut seen = Vec::new();
    for id in &ids {
        let c = final_container(&h, id, Duration::from_secs(120));
        assert_eq!(c.exit_code, Some(0), "{c:?}");
        created.insert(c.created_at_ms);
        let logs = h.client().logs(id, "stdout").expect("logs");
        seen.push(text(&logs).trim().to_string());
    }
    // One request, one transaction: one creation time.
    assert_eq!(created.len(), 1, "{created:?}");
    let expected: Vec<String> = (0..100).map(|i| format!("index={i}")).collect();
    assert_eq!(seen, expected);
    // `ps` shows a page; `--all` walks them.
    let page = cli(&["ps", "--config", &config, "--json", "--limit", "30"]);
    let page: serde_json::Value = serde_json::from_slice(&page.stdout).expect("json");
    assert_eq!(page.as_array().map(Vec::len), Some(30));
    let all = cli(&[
        "ps", "--config", &config, "--json", "--all", "--limit", "30",
    ]);
    let all: serde_json::Value = serde_json::from_slice(&all.stdout).expect("json");
    assert_eq!(all.as_array().map(Vec::len), Some(100));
}

#[test]
fn a_runner_speaking_another_protocol_is_not_used_and_says_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let old = dir.path().join("old-runner");
    std::fs::write(
        &old,
        format!(
            "#!/bin/sh\nif [ \"$2\" = version ]; then echo 1; exit 0; fi\nexec '{}' \"$@\"\n",
            built("dispatch-cloud").display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: TYPES.into(),
        runner_path: Some(old),
        ..HarnessOptions::default()
    });
    let c = h.client().submit(&shell("true")).expect("submit");
    h.wait_for("the VM's reason", Duration::from_secs(20), || {
        h.client().instances().is_ok_and(|l| {
            l.iter().any(|i| {
                i.reason.as_deref().is_some_and(|r| {
                    r.contains(&format!(
                        "speaks protocol Some(1); this host needs {}",
                        dispatch_cloud::runner::PROTOCOL
                    ))
                })
            })
        })
    });
    let now = get(&h, &c.id).expect("container");
    assert!(
        matches!(now.state, ContainerState::Queued | ContainerState::Locked),
        "{now:?}"
    );
    assert!(h.log().contains("speaks protocol"), "not logged");
}

#[test]
fn a_vm_whose_stream_is_alive_outlives_the_probe_timeout_between_rare_probes() {
    // Probes every 60 s, probe timeout 20 s: only the stream's heartbeats keep the VM in use.
    let h = ServeHarness::start_opts(rare_probes());
    let c = h
        .client()
        .submit(&shell("sleep 28; exit 3"))
        .expect("submit");
    let done = final_container(&h, &c.id, Duration::from_secs(60));
    assert_eq!(done.exit_code, Some(3), "{done:?}");
    assert_eq!(done.dispatch_attempts, 0, "{done:?}");
    assert!(
        !h.log().contains("probe timeout"),
        "a VM with a live event stream was shut down"
    );
}
