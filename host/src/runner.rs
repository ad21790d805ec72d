//! The worker side: `dispatch-cloud runner start|list|kill|logs|forget`, run on a VM over SSH.
//!
//! Each container gets a directory `<root>/var/lib/dispatch-cloud/runs/<id>/` holding its spec,
//! `stdout`, `stderr`, a `lock` held by its supervisor for as long as it runs, and `exit.json`,
//! written atomically when it ends. The directory is created once: a second `start` of the same
//! ID never runs the container again, which is what makes "exactly once" hold across host
//! crashes. The host pulls results (`list`, `logs`) and then `forget`s the directory; the VM
//! needs no credentials for, and no route to, the host.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Where `${DISPATCH_CLOUD_VM_ROOT}` points (loopback); unset on a real VM.
pub const VM_ROOT_ENV: &str = "DISPATCH_CLOUD_VM_ROOT";
/// The broken-node flag, relative to the VM root.
pub const BROKEN_FLAG: &str = "var/lock/dispatch-cloud-runner-broken";
/// Where the host deploys its executable, relative to the VM root.
pub const DEPLOY_DIR: &str = "var/lib/dispatch-cloud/bin";

/// What `start` reads on stdin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub id: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
}

/// `exit.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The exit code; 128 + N when killed by signal N.
    pub exit_code: i32,
    /// Set when the command could not be run at all.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Exited,
    /// Its supervisor is gone without writing an exit status (e.g. the VM rebooted).
    Stale,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEntry {
    pub id: String,
    pub state: RunState,
    pub exit: Option<ExitRecord>,
}

/// What `list` prints (one JSON document).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunList {
    pub containers: Vec<RunEntry>,
    pub broken: bool,
}

fn vm_root() -> PathBuf {
    std::env::var_os(VM_ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn runs_dir() -> PathBuf {
    vm_root().join("var/lib/dispatch-cloud/runs")
}

fn valid_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("invalid container ID {id:?}");
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Entry point for `dispatch-cloud runner ARGS…`; returns the process exit code.
pub fn main(args: &[String]) -> anyhow::Result<i32> {
    let arg = |i: usize, what: &str| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("runner: missing {what}"))
    };
    match arg(0, "subcommand")? {
        "start" => start(),
        "supervise" => supervise(arg(1, "container ID")?),
        "list" => {
            let list = list()?;
            println!("{}", serde_json::to_string(&list)?);
            Ok(0)
        }
        "kill" => {
            let signal: i32 = arg(1, "signal")?.parse().context("runner kill: signal")?;
            kill(arg(2, "container ID")?, signal)
        }
        "logs" => logs(arg(1, "container ID")?, arg(2, "stdout or stderr")?),
        "forget" => forget(arg(1, "container ID")?),
        other => bail!("runner: unknown subcommand {other:?} (start, list, kill, logs, forget)"),
    }
}

/// How long `start` waits for the supervisor to take its lock.
const SUPERVISOR_START_LIMIT: Duration = Duration::from_secs(10);

/// Reads the spec on stdin, creates the run directory and detaches a supervisor. Exits 0 once
/// the supervisor holds the lock, or at once if this ID was started before (never twice).
fn start() -> anyhow::Result<i32> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let spec: ContainerSpec =
        serde_json::from_str(&input).context("runner start: spec on stdin")?;
    valid_id(&spec.id)?;
    if spec.command.is_empty() {
        bail!("runner start: empty command");
    }
    let runs = runs_dir();
    std::fs::create_dir_all(&runs)?;
    let dir = runs.join(&spec.id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            println!("{} already started", spec.id);
            return Ok(0);
        }
        Err(e) => return Err(e).context("runner start: run directory"),
    }
    std::fs::write(dir.join("spec.json"), input.as_bytes())?;
    let exe = std::env::current_exe()?;
    // setsid: the supervisor must outlive this SSH command and its session.
    let mut supervisor = Command::new(exe);
    supervisor
        .args(["runner", "supervise", &spec.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        supervisor.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    supervisor.spawn().context("runner start: supervisor")?;
    let deadline = Instant::now() + SUPERVISOR_START_LIMIT;
    while !dir.join("pid").exists() && !dir.join("exit.json").exists() {
        if Instant::now() > deadline {
            bail!("runner start: supervisor of {} did not start", spec.id);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(0)
}

fn engine() -> Option<&'static str> {
    ["docker", "podman"].into_iter().find(|e| {
        Command::new(e)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

fn build_command(spec: &ContainerSpec) -> anyhow::Result<Command> {
    let workdir = spec.working_dir.clone();
    match &spec.image {
        Some(image) => {
            let Some(engine) = engine() else {
                bail!(
                    "container asks for image {image}, but this VM has neither docker nor podman"
                );
            };
            let mut cmd = Command::new(engine);
            cmd.args([
                "run",
                "--rm",
                "--name",
                &format!("dispatch-cloud-{}", spec.id),
            ]);
            if let Some(wd) = &workdir {
                cmd.args(["--workdir", wd]);
            }
            for (k, v) in &spec.env {
                cmd.arg("--env").arg(format!("{k}={v}"));
            }
            cmd.arg(image).args(&spec.command);
            Ok(cmd)
        }
        None => {
            let mut cmd = Command::new(&spec.command[0]);
            cmd.args(&spec.command[1..]).envs(&spec.env);
            let root = vm_root();
            let dir = match &workdir {
                Some(wd) => root.join(wd.trim_start_matches('/')),
                None => runs_dir().join(&spec.id),
            };
            cmd.current_dir(dir);
            Ok(cmd)
        }
    }
}

/// The detached supervisor: holds the lock, runs the container, writes `exit.json`.
fn supervise(id: &str) -> anyhow::Result<i32> {
    valid_id(id)?;
    let dir = runs_dir().join(id);
    // Locked before it gets its name: a visible `lock` that is not held always means the
    // supervisor is gone (a probe in between must not see an unheld lock and call it Stale).
    let lock = File::create(dir.join("lock.new"))?;
    lock.lock()?;
    std::fs::rename(dir.join("lock.new"), dir.join("lock"))?;
    std::fs::write(dir.join("pid"), std::process::id().to_string())?;
    let spec: ContainerSpec = serde_json::from_slice(&std::fs::read(dir.join("spec.json"))?)?;
    let record = match build_command(&spec).and_then(|mut cmd| {
        cmd.stdin(Stdio::null())
            .stdout(File::create(dir.join("stdout"))?)
            .stderr(File::create(dir.join("stderr"))?)
            // Its own process group, so a kill reaches everything it started.
            .process_group(0);
        Ok(cmd.spawn()?)
    }) {
        Ok(mut child) => {
            std::fs::write(dir.join("child.pid"), child.id().to_string())?;
            let status = child.wait()?;
            let code = status.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
            });
            ExitRecord {
                exit_code: code,
                error: None,
            }
        }
        Err(e) => ExitRecord {
            exit_code: 127,
            error: Some(format!("{e:#}")),
        },
    };
    write_atomically(&dir.join("exit.json"), &serde_json::to_vec(&record)?)?;
    drop(lock);
    Ok(0)
}

fn read_exit(dir: &Path) -> Option<ExitRecord> {
    std::fs::read(dir.join("exit.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn entry(dir: &Path, id: &str) -> RunEntry {
    if let Some(exit) = read_exit(dir) {
        return RunEntry {
            id: id.to_string(),
            state: RunState::Exited,
            exit: Some(exit),
        };
    }
    let held = match File::open(dir.join("lock")) {
        Ok(f) => f.try_lock().is_err(),
        // No lock file: the supervisor is still starting, unless the directory is older than
        // any start takes (`start` gives up after 10 s) — then no supervisor ever came.
        Err(_) => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < SUPERVISOR_START_LIMIT + Duration::from_secs(5)),
    };
    // The supervisor may have written exit.json between the two checks.
    if let Some(exit) = read_exit(dir) {
        return RunEntry {
            id: id.to_string(),
            state: RunState::Exited,
            exit: Some(exit),
        };
    }
    RunEntry {
        id: id.to_string(),
        state: if held {
            RunState::Running
        } else {
            RunState::Stale
        },
        exit: None,
    }
}

fn list() -> anyhow::Result<RunList> {
    let mut out = RunList {
        containers: Vec::new(),
        broken: vm_root().join(BROKEN_FLAG).exists(),
    };
    let runs = runs_dir();
    let dirs = match std::fs::read_dir(&runs) {
        Ok(dirs) => dirs,
        // Nothing ever ran here.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        // An unreadable directory must not look like "nothing runs" to the host.
        Err(e) => return Err(e).with_context(|| format!("runner list: {}", runs.display())),
    };
    for d in dirs.flatten() {
        let Some(id) = d.file_name().to_str().map(String::from) else {
            continue;
        };
        out.containers.push(entry(&d.path(), &id));
    }
    out.containers.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Sends `signal` to the container's process group once; exit 0 when it is gone within 1 s.
fn kill(id: &str, signal: i32) -> anyhow::Result<i32> {
    valid_id(id)?;
    let dir = runs_dir().join(id);
    let gone = || entry(&dir, id).state != RunState::Running;
    if !dir.exists() || gone() {
        return Ok(0);
    }
    if let Some(pgid) = std::fs::read_to_string(dir.join("child.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        // SAFETY: kill(2) on a process group this runner created; ESRCH is harmless.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if gone() {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(1)
}

fn logs(id: &str, stream: &str) -> anyhow::Result<i32> {
    valid_id(id)?;
    if stream != "stdout" && stream != "stderr" {
        bail!("runner logs: stream must be stdout or stderr");
    }
    let path = runs_dir().join(id).join(stream);
    match File::open(&path) {
        Ok(mut f) => {
            std::io::copy(&mut f, &mut std::io::stdout())?;
            Ok(0)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

fn forget(id: &str) -> anyhow::Result<i32> {
    valid_id(id)?;
    let dir = runs_dir().join(id);
    if !dir.exists() {
        return Ok(0);
    }
    if entry(&dir, id).state == RunState::Running {
        bail!("runner forget: {id} is still running");
    }
    std::fs::remove_dir_all(dir)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        assert!(valid_id("zzzzz-dz642-0123456789abcde").is_ok());
        for bad in ["", "../etc", "a b", "a/b"] {
            assert!(valid_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn list_output_round_trips() {
        let list = RunList {
            containers: vec![RunEntry {
                id: "c1".into(),
                state: RunState::Exited,
                exit: Some(ExitRecord {
                    exit_code: 3,
                    error: None,
                }),
            }],
            broken: true,
        };
        let text = serde_json::to_string(&list).expect("json");
        assert_eq!(serde_json::from_str::<RunList>(&text).expect("parse"), list);
    }
}
