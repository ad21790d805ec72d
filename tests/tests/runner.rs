//! The runner-only executable (`dispatch-cloud-runner`) on a directory standing in for a VM's
//! root: what `start`, `watch`, `collect` and `list` promise the host.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatch_cloud::runner::{
    CollectHeader, ContainerSpec, RunList, RunState, WatchLine, VM_ROOT_ENV,
};
use system_tests::*;

fn runner(root: &Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(built("dispatch-cloud-runner"))
        .args(args)
        .env(VM_ROOT_ENV, root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runner");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write");
    child.wait_with_output().expect("wait")
}

fn start(root: &Path, id: &str, script: &str) {
    let spec = ContainerSpec {
        id: id.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        env: Default::default(),
        working_dir: None,
        image: None,
        run_as: Default::default(),
    };
    let out = runner(
        root,
        &["runner", "start"],
        &serde_json::to_vec(&spec).expect("json"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn list(root: &Path) -> RunList {
    let out = runner(root, &["list"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("list json")
}

fn state(root: &Path, id: &str) -> Option<RunState> {
    list(root)
        .containers
        .into_iter()
        .find(|e| e.id == id)
        .map(|e| e.state)
}

/// Kills the watcher when the test ends, however it ends.
struct Watcher(Child);

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_started_run_is_locked_at_once_and_never_runs_twice() {
    let root = tempfile::tempdir().expect("tmp");
    let count = root.path().join("count");
    let script = format!("echo x >> '{}'; sleep 0.5", count.display());
    start(root.path(), "c1", &script);
    // `start` returned: the run is locked already, never a lockless window.
    assert_eq!(state(root.path(), "c1"), Some(RunState::Running));
    start(root.path(), "c1", &script);
    eventually("c1 to exit", Duration::from_secs(10), || {
        state(root.path(), "c1") == Some(RunState::Exited)
    });
    assert_eq!(std::fs::read_to_string(&count).expect("count"), "x\n");
}

#[test]
fn a_run_directory_nobody_locked_is_stale() {
    let root = tempfile::tempdir().expect("tmp");
    let dir = root.path().join("var/lib/dispatch-cloud/runs/c-left");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("spec.json"), "{}").expect("spec");
    // Fresh, it may be a start in progress.
    assert_eq!(state(root.path(), "c-left"), Some(RunState::Running));
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::open(&dir)
        .expect("open dir")
        .set_modified(old)
        .expect("age it");
    assert_eq!(state(root.path(), "c-left"), Some(RunState::Stale));
}

#[test]
fn watch_reports_what_happened_before_then_each_change_as_it_happens() {
    let root = tempfile::tempdir().expect("tmp");
    start(root.path(), "before", "exit 3");
    eventually("before to exit", Duration::from_secs(10), || {
        state(root.path(), "before") == Some(RunState::Exited)
    });
    let mut watcher = Watcher(
        Command::new(built("dispatch-cloud-runner"))
            .args(["runner", "watch"])
            .env(VM_ROOT_ENV, root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("watch"),
    );
    let mut lines = BufReader::new(watcher.0.stdout.take().expect("stdout")).lines();
    let mut next = || -> WatchLine {
        let line = lines.next().expect("a line").expect("read");
        serde_json::from_str(&line).expect("watch json")
    };
    match next() {
        WatchLine::Snapshot(list) => {
            let before = &list.containers[0];
            assert_eq!(
                (before.id.as_str(), &before.state),
                ("before", &RunState::Exited)
            );
            assert_eq!(before.exit.as_ref().map(|e| e.exit_code), Some(3));
        }
        other => panic!("first line {other:?}"),
    }
    start(root.path(), "live", "sleep 0.3; exit 5");
    let mut seen = Vec::new();
    while seen.last() != Some(&RunState::Exited) {
        match next() {
            WatchLine::Run(e) if e.id == "live" => {
                if let Some(exit) = &e.exit {
                    assert_eq!(exit.exit_code, 5);
                    let ran =
                        exit.finished_at_ms.expect("end") - exit.started_at_ms.expect("start");
                    assert!((300..1_000).contains(&ran), "ran {ran} ms");
                }
                seen.push(e.state);
            }
            WatchLine::Heartbeat => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec![RunState::Running, RunState::Exited]);
}

#[test]
fn collect_frames_result_and_logs_and_caps_them() {
    let root = tempfile::tempdir().expect("tmp");
    start(
        root.path(),
        "c2",
        "printf 0123456789; printf err >&2; exit 4",
    );
    let out = runner(root.path(), &["collect", "c2", "4"], b"");
    // Not finished yet, or finished: both answers are well-formed.
    if out.status.code() == Some(3) {
        eventually("c2 to exit", Duration::from_secs(10), || {
            state(root.path(), "c2") == Some(RunState::Exited)
        });
    }
    let out = runner(root.path(), &["collect", "c2", "4"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let end = out.stdout.iter().position(|b| *b == b'\n').expect("header");
    let header: CollectHeader = serde_json::from_slice(&out.stdout[..end]).expect("header");
    assert_eq!(header.exit.exit_code, 4);
    assert_eq!((header.stdout.sent, header.stdout.total), (4, 10));
    assert_eq!((header.stderr.sent, header.stderr.total), (3, 3));
    assert_eq!(&out.stdout[end + 1..], b"0123err");
}

#[test]
fn a_start_carries_the_forget_of_finished_runs_and_forget_takes_many() {
    let root = tempfile::tempdir().expect("tmp");
    for id in ["done1", "done2"] {
        start(root.path(), id, "true");
    }
    eventually("both to exit", Duration::from_secs(10), || {
        state(root.path(), "done1") == Some(RunState::Exited)
            && state(root.path(), "done2") == Some(RunState::Exited)
    });
    let spec = ContainerSpec {
        id: "next".into(),
        command: vec!["sleep".into(), "1".into()],
        env: Default::default(),
        working_dir: None,
        image: None,
        run_as: Default::default(),
    };
    let out = runner(
        root.path(),
        &["runner", "start", "done1"],
        &serde_json::to_vec(&spec).expect("json"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(state(root.path(), "done1"), None, "carried forget");
    assert_eq!(state(root.path(), "next"), Some(RunState::Running));
    // A running one is refused (exit 1), the finished one is forgotten all the same.
    let out = runner(root.path(), &["forget", "next", "done2"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(state(root.path(), "done2"), None);
    assert_eq!(state(root.path(), "next"), Some(RunState::Running));
}
