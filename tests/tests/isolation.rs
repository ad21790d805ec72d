//! Containers sharing a VM cannot reach each other: each runs as a user ID of its own
//! (`container_user = per-run`, the default), in a working directory of its own, with the run
//! directories (specs, results, logs) open to the runner alone.

use std::collections::BTreeMap;
use std::time::Duration;

use dispatch_cloud::queue::{ContainerState, NewContainer, RuntimeConstraints};
use system_tests::*;

/// A word that differs between calls in one process.
fn rand_word() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(7919, Ordering::SeqCst)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
}

fn one_vcpu(script: &str, env: &[(&str, &str)]) -> NewContainer {
    NewContainer {
        command: vec!["sh".into(), "-c".into(), script.into()],
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        priority: 1,
        runtime_constraints: RuntimeConstraints {
            vcpus: 1,
            ram_bytes: 64 << 20,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Container A attacks container B on the same VM; returns what A printed and B's record.
fn attack(container_user: Option<&str>) -> (String, dispatch_cloud::queue::Container) {
    // One type of 2 vCPUs: the two 1-vCPU containers share a VM.
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: ONE_SMALL_TYPE.into(),
        limits_extra: "max_instances = 1".into(),
        top_extra: container_user
            .map(|u| format!("container_user = {u:?}"))
            .unwrap_or_default(),
        ..HarnessOptions::default()
    });
    // B's own marker: tests run side by side, and the attack must find this B alone.
    let marker = format!(
        "victim{}",
        std::process::id() ^ h.url.len() as u32 ^ rand_word()
    );
    let b = h
        .client()
        .submit(&one_vcpu(
            &format!("sleep 8; : {marker}-b; exit 3"),
            &[("SECRET", "b-secret-9f3a")],
        ))
        .expect("submit B")
        .id;
    h.wait_for_state(&b, ContainerState::Running, Duration::from_secs(60));
    // Everything A tries prints a word only when it works.
    let attack = format!(
        r#"pgrep -f '{marker}[-]b' >/dev/null && echo SAW-B
R="$DISPATCH_CLOUD_VM_ROOT/var/lib/dispatch-cloud/runs"
cat "$R/{b}/spec.json" 2>/dev/null && echo READ-SPEC
ls "$R" >/dev/null 2>&1 && echo LISTED-RUNS
cat "$R/{b}/stdout" >/dev/null 2>&1 && echo READ-LOG
for p in /proc/[0-9]*; do
  tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -q b-secret && echo READ-ENV
done
echo '{{"exit_code":0}}' 2>/dev/null > "$R/{b}/exit.json" && echo WROTE-EXIT
touch "$DISPATCH_CLOUD_VM_ROOT/var/lib/dispatch-cloud/broken" 2>/dev/null && echo FLAGGED-BROKEN
ls "$DISPATCH_CLOUD_VM_ROOT/var/lib/dispatch-cloud/work" >/dev/null 2>&1 && echo LISTED-WORK
pkill -9 -f '{marker}[-]b' 2>/dev/null && echo KILLED-B
ls "$DISPATCH_CLOUD_VM_ROOT/var/lib/dispatch-cloud/work/{b}" >/dev/null 2>&1 && echo ENTERED-WORKDIR
id -u
echo A-DONE"#
    );
    let a = h
        .client()
        .submit(&one_vcpu(&attack, &[]))
        .expect("submit A")
        .id;
    h.wait_for_state(&a, ContainerState::Complete, Duration::from_secs(60));
    h.wait_for_state(&b, ContainerState::Complete, Duration::from_secs(60));
    let (a_done, b_done) = (
        h.client().get(&a).expect("A"),
        h.client().get(&b).expect("B"),
    );
    assert_eq!(a_done.instance_id, b_done.instance_id, "both ran on one VM");
    let out = text(&h.client().logs(&a, "stdout").expect("A's stdout"));
    assert!(out.contains("A-DONE"), "A's script ran: {out}");
    assert!(
        out.contains("SAW-B"),
        "B was running while A attacked: {out}"
    );
    (out, b_done)
}

#[test]
fn a_container_cannot_read_or_forge_another_on_the_same_vm() {
    let (out, b_done) = attack(None);
    for word in [
        "READ-SPEC",
        "LISTED-RUNS",
        "READ-LOG",
        "READ-ENV",
        "WROTE-EXIT",
        "KILLED-B",
        "ENTERED-WORKDIR",
        "FLAGGED-BROKEN",
        "LISTED-WORK",
    ] {
        assert!(!out.contains(word), "A managed {word}:\n{out}");
    }
    assert!(!out.contains("b-secret"), "{out}");
    let uid: u32 = out
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .expect("A printed its uid");
    assert!(
        uid >= dispatch_cloud::runner::PER_RUN_UID_BASE,
        "A ran as a per-run user, not {uid}"
    );
    // B ended by itself, with its own code, and its result is its own.
    assert_eq!(b_done.exit_code, Some(3), "{b_done:?}");
}

/// The same attack with `container_user = "runner"` (root on these VMs): it works, which is
/// what the default prevents.
#[test]
fn without_isolation_the_same_attack_reads_the_secret() {
    let (out, _) = attack(Some("runner"));
    assert!(
        out.contains("READ-SPEC") && out.contains("READ-ENV"),
        "{out}"
    );
}

/// What a run leaves running in the background dies when the run is forgotten: its user ID
/// must be free before another run can be given it.
#[test]
fn a_runs_leftover_processes_end_when_it_is_forgotten() {
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: ONE_SMALL_TYPE.into(),
        ..HarnessOptions::default()
    });
    let marker = format!("leftover{}", rand_word());
    let id = h
        .client()
        .submit(&one_vcpu(
            &format!("setsid sh -c 'sleep 300; : {marker}' >/dev/null 2>&1 & exit 0"),
            &[],
        ))
        .expect("submit")
        .id;
    h.wait_for_state(&id, ContainerState::Complete, Duration::from_secs(60));
    let running = || {
        std::process::Command::new("pgrep")
            .args(["-f", &format!("{marker}$")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    h.wait_for("the leftover to be killed", Duration::from_secs(30), || {
        !running()
    });
}
