//! The dispatcher end to end: the real `dispatch-cloud serve`, the real loopback `.so`, real SSH,
//! real runners on loopback VMs. Timeouts are compressed (see `FAST_CLUSTER_CONFIG`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use dispatch_cloud::queue::{Container, ContainerState, NewContainer, RuntimeConstraints};
use driver_abi::Tags;
use system_tests::*;

const TYPES: &str = THREE_TYPES;

const MIB: u64 = 1 << 20;

/// A container that appends `tag` to `runs` (outside every VM), so a second run would show.
fn job(runs: &str, tag: &str, vcpus: u32, ram: u64, priority: i64, body: &str) -> NewContainer {
    let mut env = BTreeMap::new();
    env.insert("TAG".into(), tag.into());
    env.insert("RUNS".into(), runs.into());
    NewContainer {
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("echo \"$TAG\" >> \"$RUNS\"; {body}"),
        ],
        env,
        working_dir: None,
        image: None,
        priority,
        runtime_constraints: RuntimeConstraints {
            vcpus,
            ram_bytes: ram,
            scratch_bytes: 0,
            gpus: 0,
            preemptible: false,
        },
    }
}

fn runs_file(h: &ServeHarness) -> String {
    h.dir.path().join("runs.log").display().to_string()
}

fn run_counts(h: &ServeHarness) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(runs_file(h))
        .unwrap_or_default()
        .lines()
    {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    counts
}

fn all_final(h: &ServeHarness, ids: &[String]) -> bool {
    match h.client().list() {
        Ok(list) => {
            let done: HashMap<&str, &Container> = list.iter().map(|c| (c.id.as_str(), c)).collect();
            ids.iter()
                .all(|id| done.get(id.as_str()).is_some_and(|c| c.state.is_final()))
        }
        Err(_) => false,
    }
}

fn cloud_vm_count(h: &ServeHarness) -> usize {
    let (_p, _e, set) = loopback_set(&h.cloud, "zzzzz-zzzzz-servetest000000", "");
    set.instances(&Tags::new())
        .map(|l| l.len())
        .unwrap_or(usize::MAX)
}

fn wait_until_nothing_left(h: &ServeHarness) {
    h.wait_for("idle VMs to shut down", Duration::from_secs(60), || {
        h.client()
            .instances()
            .map(|l| l.is_empty())
            .unwrap_or(false)
            && cloud_vm_count(h) == 0
    });
}

#[test]
fn a_mixed_batch_completes_packed_and_idle_vms_go_away() {
    let h = ServeHarness::start(TYPES, "");
    let runs = runs_file(&h);
    let client = h.client();
    let vcpus = [1, 1, 2, 1, 3, 6];
    let rams = [256 * MIB, 512 * MIB, 1024 * MIB, 3072 * MIB];
    let mut expected = HashMap::new();
    let mut ids = Vec::new();
    for i in 0..50usize {
        let tag = format!("job{i}");
        let body = format!(
            "sleep 0.{}; echo out-$TAG; echo err-$TAG >&2; exit {}",
            4 + i % 5,
            i % 5
        );
        let c = client
            .submit(&job(
                &runs,
                &tag,
                vcpus[i % 6],
                rams[i % 4],
                1 + (i % 10) as i64,
                &body,
            ))
            .expect("submit");
        expected.insert(c.id.clone(), (tag, (i % 5) as i32));
        ids.push(c.id);
    }
    h.wait_for("50 containers to finish", Duration::from_secs(180), || {
        all_final(&h, &ids)
    });

    let list = client.list().expect("list");
    let ours: Vec<&Container> = list
        .iter()
        .filter(|c| expected.contains_key(&c.id))
        .collect();
    assert_eq!(ours.len(), 50);
    for c in &ours {
        let (tag, code) = &expected[&c.id];
        assert_eq!(c.state, ContainerState::Complete, "{c:?}");
        assert_eq!(c.exit_code, Some(*code), "{c:?}");
        assert_eq!(
            text(&client.logs(&c.id, "stdout").expect("stdout")),
            format!("out-{tag}\n")
        );
        assert_eq!(
            text(&client.logs(&c.id, "stderr").expect("stderr")),
            format!("err-{tag}\n")
        );
    }
    let counts = run_counts(&h);
    for (tag, _) in expected.values() {
        assert_eq!(
            counts.get(tag),
            Some(&1),
            "{tag} ran {:?} times",
            counts.get(tag)
        );
    }
    // Packing: two containers overlapped in time on one VM.
    let mut by_instance: HashMap<&str, Vec<&Container>> = HashMap::new();
    for c in &ours {
        by_instance
            .entry(c.instance_id.as_deref().unwrap_or(""))
            .or_default()
            .push(c);
    }
    let packed = by_instance.values().any(|cs| {
        cs.iter().any(|a| {
            cs.iter().any(|b| {
                a.id != b.id
                    && a.started_at_ms < b.finished_at_ms
                    && b.started_at_ms < a.finished_at_ms
            })
        })
    });
    assert!(packed, "no VM ran two containers at once: {by_instance:#?}");
    assert!(
        by_instance.len() < 50,
        "every container had a VM of its own"
    );
    wait_until_nothing_left(&h);
}

#[test]
fn unsatisfiable_cancel_and_priority_zero() {
    let h = ServeHarness::start(TYPES, "");
    let runs = runs_file(&h);
    let client = h.client();
    let huge = client
        .submit(&job(&runs, "huge", 64, MIB, 1, "true"))
        .expect("submit");
    h.wait_for(
        "the unsatisfiable container to be cancelled",
        Duration::from_secs(30),
        || {
            client
                .get(&huge.id)
                .map(|c| c.state == ContainerState::Cancelled)
                .unwrap_or(false)
        },
    );
    let reason = client
        .get(&huge.id)
        .expect("get")
        .runtime_error
        .unwrap_or_default();
    assert!(reason.starts_with("no instance type fits"), "{reason}");
    assert!(reason.contains("64 vCPUs"), "{reason}");

    let a = client
        .submit(&job(&runs, "a", 1, MIB, 1, "sleep 60"))
        .expect("a");
    let b = client
        .submit(&job(&runs, "b", 1, MIB, 1, "sleep 60"))
        .expect("b");
    h.wait_for("both to run", Duration::from_secs(60), || {
        [&a.id, &b.id].iter().all(|id| {
            client
                .get(id)
                .map(|c| c.state == ContainerState::Running)
                .unwrap_or(false)
        })
    });
    client.cancel(&a.id).expect("cancel");
    client.set_priority(&b.id, 0).expect("priority 0");
    h.wait_for("b to end", Duration::from_secs(30), || {
        client
            .get(&b.id)
            .map(|c| c.state.is_final())
            .unwrap_or(false)
    });
    let b_now = client.get(&b.id).expect("b");
    assert_eq!(b_now.state, ContainerState::Cancelled, "{b_now:?}");
    assert!(b_now.runtime_error.unwrap_or_default().contains("priority"));
    assert_eq!(
        client.get(&a.id).expect("a").state,
        ContainerState::Cancelled
    );
    // Both `sleep 60`s were stopped: the VMs become idle and go away long before 60 s.
    h.wait_for(
        "the killed containers' VMs to empty",
        Duration::from_secs(30),
        || {
            client
                .instances()
                .map(|l| l.iter().all(|i| i.containers.is_empty()))
                .unwrap_or(false)
        },
    );
    wait_until_nothing_left(&h);
}

#[test]
fn kill_9_and_restart_ends_every_container_exactly_once() {
    let mut h = ServeHarness::start(TYPES, "");
    let runs = runs_file(&h);
    let mut ids = Vec::new();
    for i in 0..20 {
        let c = h
            .client()
            .submit(&job(
                &runs,
                &format!("r{i}"),
                1,
                256 * MIB,
                1,
                "sleep 1.5; echo done",
            ))
            .expect("submit");
        ids.push(c.id);
    }
    h.wait_for("some containers to run", Duration::from_secs(60), || {
        h.client()
            .list()
            .map(|l| {
                l.iter()
                    .filter(|c| c.state == ContainerState::Running)
                    .count()
                    >= 3
            })
            .unwrap_or(false)
    });
    h.kill();
    // Not a synchronisation: the outage itself is under test (runners finish while no
    // dispatcher is up; the next one must find their results).
    std::thread::sleep(Duration::from_millis(500));
    h.spawn();
    h.wait_for(
        "every container to end after the restart",
        Duration::from_secs(120),
        || all_final(&h, &ids),
    );
    let list = h.client().list().expect("list");
    for c in list.iter().filter(|c| ids.contains(&c.id)) {
        assert_eq!(c.state, ContainerState::Complete, "{c:?}");
        assert_eq!(c.exit_code, Some(0));
    }
    let counts = run_counts(&h);
    for i in 0..20 {
        assert_eq!(counts.get(&format!("r{i}")), Some(&1), "r{i}: {counts:?}");
    }
    assert!(
        h.log().contains("state=Unknown"),
        "the restarted dispatcher did not re-adopt VMs from their tags"
    );
    wait_until_nothing_left(&h);
}

#[test]
fn the_batch_completes_exactly_once_under_cloud_faults() {
    let faults = "[instance_sets.parameters.faults]\n\
                  create_error_rate = 0.1\n\
                  destroy_error_rate = 0.1\n\
                  max_instances = 4\n\
                  create_rate_limit_ms = 150\n\
                  capacity_error_types = [\"lb.medium\"]\n\
                  broken_after_ms = 800\n";
    let h = ServeHarness::start(TYPES, faults);
    let runs = runs_file(&h);
    let mut ids = Vec::new();
    for i in 0..30usize {
        let vcpus = [1, 2, 3][i % 3];
        let c = h
            .client()
            .submit(&job(
                &runs,
                &format!("f{i}"),
                vcpus,
                512 * MIB,
                1 + (i % 4) as i64,
                "sleep 0.5; exit 0",
            ))
            .expect("submit");
        ids.push(c.id);
    }
    h.wait_for(
        "the batch to finish under faults",
        Duration::from_secs(240),
        || all_final(&h, &ids),
    );
    let list = h.client().list().expect("list");
    for c in list.iter().filter(|c| ids.contains(&c.id)) {
        assert_eq!(c.state, ContainerState::Complete, "{c:?}");
        assert_ne!(
            c.instance_type.as_deref(),
            Some("medium"),
            "a type at capacity was used"
        );
    }
    let counts = run_counts(&h);
    for i in 0..30 {
        assert_eq!(counts.get(&format!("f{i}")), Some(&1), "f{i}: {counts:?}");
    }
    let log = h.log();
    for fault in ["quota exceeded", "no capacity", "rate limited", "broken"] {
        assert!(
            log.contains(fault),
            "the fault {fault:?} never showed in the log"
        );
    }
    wait_until_nothing_left(&h);
}

#[test]
fn cli_submit_wait_exits_with_the_containers_exit_code() {
    // This one deploys the host's own executable to the VM, as production does.
    let h = ServeHarness::start_with(TYPES, "", true);
    let config = h.config_file().display().to_string();
    let out = cli(&[
        "submit",
        "--config",
        &config,
        "--ram",
        "256MiB",
        "--wait",
        "--env",
        "WHO=world",
        "--",
        "sh",
        "-c",
        "echo hello $WHO; exit 42",
    ]);
    assert_eq!(out.status.code(), Some(42), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let logs = cli(&["logs", "--config", &config, &id]);
    assert_eq!(text(&logs.stdout), "hello world\n");
    let ps = cli(&["ps", "--config", &config, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&ps.stdout).expect("json");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "Complete");
    assert_eq!(list[0]["exit_code"], 42);
    let inst = cli(&["instances", "--config", &config, "--json"]);
    assert!(inst.status.success());
    assert!(serde_json::from_slice::<serde_json::Value>(&inst.stdout)
        .expect("json")
        .is_array());
}

#[test]
fn check_config_lists_every_problem_and_serve_refuses_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        "cluster_id = \"ZZ\"\nbogus = 1\n[timeouts]\nidle_seconds = \"soon\"\n[[instance_types]]\nname = \"a\"\nvcpus = 1\nram = \"1 parsec\"\nprice = 1.0\n",
    )
    .expect("write");
    let file = file.display().to_string();
    let out = cli(&["check-config", "--config", &file]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for needle in [
        format!("{file}:2: bogus: unknown field `bogus`"),
        format!("{file}:4: timeouts.idle_seconds:"),
        format!("{file}:8: instance_types[0].ram:"),
        format!("{file}:1: cluster_id:"),
        "4 problem(s)".to_string(),
    ] {
        assert!(
            stderr.contains(&needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }
    // An error in the second of several tables is reported at its own line and index.
    let second = dir.path().join("second.toml");
    std::fs::write(
        &second,
        "[[instance_types]]\nname = \"a\"\nvcpus = 1\nram = \"1GiB\"\nprice = 1.0\n\n[[instance_types]]\nname = \"b\"\nvcpus = \"many\"\nram = \"2GiB\"\nprice = 2.0\n",
    )
    .expect("write");
    let second = second.display().to_string();
    let out = cli(&["check-config", "--config", &second]);
    assert_eq!(out.status.code(), Some(1));
    let needle = format!("{second}:9: instance_types[1].vcpus:");
    assert!(
        text(&out.stderr).contains(&needle),
        "{needle:?} missing from:\n{}",
        text(&out.stderr)
    );
    let serve = cli(&["serve", "--config", &file]);
    assert!(!serve.status.success());
    assert!(
        text(&serve.stderr).contains("bogus"),
        "{}",
        text(&serve.stderr)
    );
}

/// A runner wrapper that refuses to start any container whose spec mentions `REFUSE_START`
/// and hands everything else to the real binary: a VM whose runner really cannot start it.
fn refusing_runner(h_dir: &std::path::Path) -> std::path::PathBuf {
    let path = h_dir.join("refusing-runner");
    let real = built("dispatch-cloud").display().to_string();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = runner ] && [ \"$2\" = start ]; then\n\
               spec=$(cat)\n\
               case \"$spec\" in *REFUSE_START*) echo 'runner start: refused by the test wrapper' >&2; exit 1;; esac\n\
               printf '%s' \"$spec\" | '{real}' \"$@\"\n\
               exit $?\n\
             fi\n\
             exec '{real}' \"$@\"\n"
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

#[test]
fn cloud_pressure_never_costs_attempts_and_real_start_failures_do() {
    let wrapper_dir = tempfile::tempdir().expect("tmp");
    let faults = "[instance_sets.parameters.faults]\n\
                  max_instances = 6\n\
                  create_rate_limit_ms = 150\n\
                  capacity_error_types = [\"lb.medium\"]\n";
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: TYPES.into(),
        loopback_extra: faults.into(),
        // Any attempt counted for a scheduler decision would cancel containers here.
        max_dispatch_attempts: 3,
        runner_path: Some(refusing_runner(wrapper_dir.path())),
        ..HarnessOptions::default()
    });
    let runs = runs_file(&h);
    let mut ids = Vec::new();
    for i in 0..200usize {
        let vcpus = if i % 10 == 0 { 3 } else { 1 };
        let c = h
            .client()
            .submit(&job(
                &runs,
                &format!("p{i}"),
                vcpus,
                256 * MIB,
                1 + (i % 3) as i64,
                "true",
            ))
            .expect("submit");
        ids.push(c.id);
    }
    let mut refused = job(&runs, "refused", 1, 256 * MIB, 1, "true");
    refused.env.insert("MARK".into(), "REFUSE_START".into());
    let refused = h.client().submit(&refused).expect("submit").id;
    ids.push(refused.clone());
    h.wait_for(
        "all 201 containers to end",
        Duration::from_secs(300),
        || all_final(&h, &ids),
    );
    let list = h.client().list().expect("list");
    let log = h.log();
    for c in list
        .iter()
        .filter(|c| ids.contains(&c.id) && c.id != refused)
    {
        assert_eq!(c.state, ContainerState::Complete, "{c:?}");
        // An attempt is only ever a start that really failed on a VM, and the log says so.
        if c.dispatch_attempts > 0 {
            let failed_start = format!("container={} to=Queued dispatch attempt failed", c.id);
            assert!(
                log.contains(&failed_start),
                "an attempt it never made: {c:?}"
            );
        }
    }
    let counts = run_counts(&h);
    for i in 0..200 {
        assert_eq!(counts.get(&format!("p{i}")), Some(&1), "p{i}: {counts:?}");
    }
    let r = h.client().get(&refused).expect("get");
    assert_eq!(r.state, ContainerState::Cancelled, "{r:?}");
    assert_eq!(r.dispatch_attempts, 3);
    assert!(
        r.runtime_error
            .as_deref()
            .is_some_and(|e| e.contains("3 failed dispatch attempts") && e.contains("refused")),
        "{r:?}"
    );
    assert_eq!(counts.get("refused"), None, "it never ran");
    for fault in ["quota exceeded", "no capacity", "rate limited"] {
        assert!(
            log.contains(fault),
            "the fault {fault:?} never showed in the log"
        );
    }
    wait_until_nothing_left(&h);
}

#[test]
fn a_driver_whose_creates_fail_is_called_rarely_and_the_reason_shows() {
    let catalogue = format!(
        "[[plugins]]\nname = \"probe\"\npath = {:?}\n\n[[instance_sets]]\nname = \"test\"\ndriver = \"probe\"\nset_id = \"zzzzz-zzzzz-failingcreates0\"\n[instance_sets.parameters]\nfail_creates = true\n",
        probe_so().display().to_string()
    );
    let h = ServeHarness::start_opts(HarnessOptions {
        catalogue: Some(catalogue),
        ..HarnessOptions::default()
    });
    let id = h
        .client()
        .submit(&job("/dev/null", "x", 1, 256 * MIB, 1, "true"))
        .expect("submit")
        .id;
    let failures = || h.log().matches("creating an instance failed").count();
    h.wait_for("a first failed create", Duration::from_secs(30), || {
        failures() >= 1
    });
    // Hold-offs of 1, 2 and 4 s: the fourth failure comes about 7 s after the first.
    h.wait_for("the fourth failed create", Duration::from_secs(30), || {
        failures() >= 4
    });
    let calls = h.log().matches("probe create called").count();
    assert_eq!(
        calls,
        failures(),
        "one warn line per hold-off, one per call"
    );
    assert!(calls <= 5, "{calls} create calls in ~7 s");
    assert!(h.log().contains("holding off creates of this type for 4s"));
    let c = h.client().get(&id).expect("get");
    assert_eq!(c.state, ContainerState::Queued, "{c:?}");
    assert_eq!(c.dispatch_attempts, 0);
    let why = c.scheduling_status.unwrap_or_default();
    assert!(why.contains("probe cloud API is down"), "{why:?}");
}
