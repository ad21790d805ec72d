//! The worker side: `dispatch-cloud runner start|list|kill|logs|forget`, run on a VM over SSH.
//!
//! Each container gets a directory `<root>/var/lib/dispatch-cloud/runs/<id>/` holding its spec,
//! `stdout`, `stderr`, a `lock` held by its supervisor for as long as it runs, and `exit.json`,
//! written atomically when it ends. The directory is created once: a second `start` of the same
//! ID never runs the container again, which is what makes "exactly once" hold across host
//! crashes. The host learns of starts and exits as they happen from `watch` (a long-lived
//! command streaming one JSON line per change), pulls a result with `collect` (exit status and
//! both logs in one framed stream) and then `forget`s the directory; the VM needs no
//! credentials for, and no route to, the host.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Where `${DISPATCH_CLOUD_VM_ROOT}` points (loopback); unset on a real VM.
pub const VM_ROOT_ENV: &str = "DISPATCH_CLOUD_VM_ROOT";
/// The broken-node flag, relative to the VM root.
/// Under a root-only directory: a container (its own user, `/var/lock` is world-writable)
/// must not be able to take its VM out of service.
pub const BROKEN_FLAG: &str = "var/lib/dispatch-cloud/broken";
/// Where the host deploys its executable, relative to the VM root.
pub const DEPLOY_DIR: &str = "var/lib/dispatch-cloud/bin";

/// The runner protocol this build speaks (`runner version`). Raised whenever a subcommand or
/// an output the host relies on changes; the host refuses a runner that speaks another.
pub const PROTOCOL: u32 = 4;

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
    /// Whom a container without an image runs as. Required: a spec that does not say is not
    /// run as anyone by default.
    pub run_as: RunAs,
}

/// Whom a container without an image runs as (`container_user` in the cluster config). With
/// an image, the container runtime's own user mapping applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunAs {
    /// A user ID of its own, unused by anything else on the VM (`per-run`): no container can
    /// read another's environment, signal it or touch its files. Needs a root runner.
    PerRun,
    /// This user, by name, for every container (`nobody`, a service account).
    User(String),
    /// The runner's own user (`runner`): no isolation between containers.
    #[default]
    Runner,
}

/// Per-run user IDs are taken from `[PER_RUN_UID_BASE, PER_RUN_UID_BASE + PER_RUN_UIDS)`, far
/// above the IDs distributions hand out, and reused once a run is forgotten.
pub const PER_RUN_UID_BASE: u32 = 0x7000_0000;
const PER_RUN_UIDS: u32 = 65_536;

/// `exit.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The exit code; 128 + N when killed by signal N.
    pub exit_code: i32,
    /// Set when the command could not be run at all.
    pub error: Option<String>,
    /// When the container's process started and ended, by the VM's clock (Unix ms). Absent
    /// from runners older than these fields.
    #[serde(default)]
    pub started_at_ms: Option<i64>,
    #[serde(default)]
    pub finished_at_ms: Option<i64>,
}

/// One line of `watch`'s output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchLine {
    /// First: every run directory as it is now (what happened while nobody listened).
    Snapshot(RunList),
    /// A run that started, ended or went stale since.
    Run(RunEntry),
    /// A run directory was forgotten (removed): the ID is no longer on this VM.
    Gone(String),
    /// The node flagged itself broken (`BROKEN_FLAG` appeared).
    Broken,
    /// Nothing changed for a while; lets the watcher notice a reader that went away.
    Heartbeat,
}

/// The first line of `collect`'s output; `stdout.sent` bytes of stdout, then `stderr.sent`
/// bytes of stderr follow it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CollectHeader {
    pub exit: ExitRecord,
    pub stdout: LogPart,
    pub stderr: LogPart,
}

/// How much of one log is sent (at most the cap asked for) out of how much was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPart {
    pub sent: u64,
    pub total: u64,
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

/// Where containers without a working directory of their own work, one directory each, owned
/// by the user they run as; outside the run directories, which only the runner may enter.
fn work_dir() -> PathBuf {
    vm_root().join("var/lib/dispatch-cloud/work")
}

/// A directory only its owner may enter, made so even when it existed (an older runner made
/// the runs directory 0755).
fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Parents as a system makes them (0755): the work directories below them must be
    // reachable by the containers' users.
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(bytes)
}

/// Holds `.uids.lock` in the runs directory: allocating a run's user ID and forgetting a run
/// (which frees one) never interleave.
fn uid_lock(runs: &Path) -> std::io::Result<File> {
    let lock = File::create(runs.join(".uids.lock"))?;
    lock.lock()?;
    Ok(lock)
}

/// The uid and gid a run gets: the next per-run ID after the last one handed out (kept in
/// `.next-uid`), skipping any a run directory still records. IDs move forward and wrap only
/// after the whole range, so an ID is not handed out again soon after its run was forgotten.
fn allocate_uid(runs: &Path, dir: &Path) -> anyhow::Result<(u32, u32)> {
    let _lock = uid_lock(runs)?;
    let mut taken = std::collections::HashSet::new();
    for entry in std::fs::read_dir(runs)?.flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path().join("uid")) {
            if let Ok(uid) = text.trim().parse::<u32>() {
                taken.insert(uid);
            }
        }
    }
    let counter = runs.join(".next-uid");
    let next: u32 = std::fs::read_to_string(&counter)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(first_slot);
    let slot = (0..PER_RUN_UIDS)
        .map(|i| (next.wrapping_add(i)) % PER_RUN_UIDS)
        .find(|s| !taken.contains(&(PER_RUN_UID_BASE + s)))
        .context("runner start: every per-run user ID is in use")?;
    let uid = PER_RUN_UID_BASE + slot;
    write_atomically(&counter, ((slot + 1) % PER_RUN_UIDS).to_string().as_bytes())?;
    write_private(&dir.join("uid"), uid.to_string().as_bytes())?;
    Ok((uid, uid))
}

/// Where a VM's counter starts: 0 on a real VM; on loopback VMs, which share one kernel,
/// somewhere of their own, so their runs rarely meet the same ID.
fn first_slot() -> u32 {
    use std::hash::{Hash, Hasher};
    std::env::var_os(VM_ROOT_ENV).map_or(0, |root| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        root.hash(&mut h);
        (h.finish() % u64::from(PER_RUN_UIDS)) as u32
    })
}

/// Ends every process still running as `uid` (a run's background children outlive it), so
/// the ID is free when its run is forgotten. Loopback VMs share one kernel: there, only the
/// processes of this VM (its root in their environment) are this VM's to end.
fn kill_uid(uid: u32) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let this_vm = std::env::var_os(VM_ROOT_ENV).map(|root| {
        let mut marker = format!("{VM_ROOT_ENV}=").into_bytes();
        marker.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(root.as_os_str()));
        marker
    });
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok());
        if real_uid != Some(uid) {
            continue;
        }
        if let Some(marker) = &this_vm {
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if !environ
                .split(|b| *b == 0)
                .any(|var| var == marker.as_slice())
            {
                continue;
            }
        }
        {
            // SAFETY: kill has no memory preconditions; the process may already be gone.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A user's uid and gid by name, from the VM's user database.
fn user_ids(name: &str) -> anyhow::Result<(u32, u32)> {
    let c_name = std::ffi::CString::new(name).context("container_user: contains a NUL byte")?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once; the runner
    // is single-threaded here.
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if entry.is_null() {
        bail!("container_user {name:?}: no such user on this VM");
    }
    // SAFETY: checked non-NULL above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok((uid, gid))
}

/// Where each `watch` binds a datagram socket that supervisors ping on every change.
fn watch_dir() -> PathBuf {
    vm_root().join("var/lib/dispatch-cloud/watch")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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

/// Entry point for `dispatch-cloud runner ARGS…` (and `dispatch-cloud-runner [runner] ARGS…`);
/// returns the process exit code.
pub fn main(args: &[String]) -> anyhow::Result<i32> {
    let arg = |i: usize, what: &str| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("runner: missing {what}"))
    };
    match arg(0, "subcommand")? {
        // `start [ID…]`: forgets those finished runs first (saving the host a command).
        "start" => {
            for id in &args[1..] {
                // Best effort: what was not forgotten is still listed, and asked again.
                let _ = forget(id);
            }
            start()
        }
        "watch" => watch(),
        "version" => {
            println!("{PROTOCOL}");
            Ok(0)
        }
        "collect" => {
            let cap: u64 = arg(2, "log byte limit")?
                .parse()
                .context("runner collect: log byte limit")?;
            collect(arg(1, "container ID")?, cap)
        }
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
        "forget" => {
            arg(1, "container ID")?;
            let mut refused = 0;
            for id in &args[1..] {
                if let Err(e) = forget(id) {
                    eprintln!("{e:#}");
                    refused += 1;
                }
            }
            Ok(i32::from(refused > 0))
        }
        other => bail!(
            "runner: unknown subcommand {other:?} (start, list, watch, collect, kill, logs, forget, version)"
        ),
    }
}

/// A run directory with no lock file is one whose `start` died before locking it (it locks
/// within milliseconds of creating it): older than this, nothing will ever run it.
const UNLOCKED_STALE_AFTER: Duration = Duration::from_secs(5);

/// Reads the spec on stdin, creates the run directory, takes its lock and forks a detached
/// supervisor that keeps it: from the moment `start` exits 0, the directory is locked for as
/// long as the container runs. A second start of an ID never runs it again.
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
    private_dir(&runs)?;
    let dir = runs.join(&spec.id);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            println!("{} already started", spec.id);
            return Ok(0);
        }
        Err(e) => return Err(e).context("runner start: run directory"),
    }
    write_private(&dir.join("spec.json"), input.as_bytes())?;
    if spec.image.is_none() && spec.run_as == RunAs::PerRun {
        allocate_uid(&runs, &dir)?;
    }
    // Locked before it gets its name: a visible `lock` that is not held always means the
    // supervisor is gone.
    let lock = File::create(dir.join("lock.new"))?;
    lock.lock()?;
    std::fs::rename(dir.join("lock.new"), dir.join("lock"))?;
    // The supervisor is a fork of this process, not a new executable: one process start
    // fewer per container. Safe here: `start` has no other thread. The child shares the
    // locked open file, so the lock is held from here on by whichever of the two is alive.
    std::io::stdout().flush()?;
    // The child says when it has its own session: until then a hang-up of this command's
    // terminal (an SSH pty, sudo's) would reach it too.
    let (mut detached_rx, mut detached_tx) = std::os::unix::net::UnixStream::pair()?;
    // SAFETY: fork in a single-threaded process; the child only runs this program's code.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("runner start: fork"),
        0 => {
            drop(detached_rx);
            let detached = detach();
            // The parent learns either way (and stops waiting).
            let _ = detached_tx.write_all(&[u8::from(detached.is_ok())]);
            drop(detached_tx);
            // Nobody reads the supervisor's errors: a run that could not be supervised shows
            // as Stale (or Exited with its error) to the host.
            std::process::exit(
                detached
                    .and_then(|()| supervise(&spec.id, lock))
                    .unwrap_or(1),
            )
        }
        _ => {
            drop(detached_tx);
            let mut ack = [0u8; 1];
            // EOF (the child died first) leaves the run to show as Stale.
            let _ = detached_rx.read(&mut ack);
            drop(lock);
            notify_watchers(&spec.id);
            Ok(0)
        }
    }
}

/// Makes the forked supervisor independent of the SSH command that started it: its own
/// session (no hang-up when the command ends) and no hold on the command's pipes.
fn detach() -> anyhow::Result<()> {
    // SAFETY: setsid has no preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(std::io::Error::last_os_error()).context("runner supervise: setsid");
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors of this process.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("runner supervise: stdio");
        }
    }
    Ok(())
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
            // Values go through the engine's environment, not its command line, which every
            // user of the VM can read in /proc.
            for (k, v) in &spec.env {
                cmd.arg("--env").arg(k).env(k, v);
            }
            cmd.arg(image).args(&spec.command);
            Ok(cmd)
        }
        None => {
            let ids = match &spec.run_as {
                RunAs::Runner => None,
                RunAs::User(name) => Some(user_ids(name)?),
                RunAs::PerRun => {
                    let text = std::fs::read_to_string(runs_dir().join(&spec.id).join("uid"))
                        .context("runner: the run's user ID")?;
                    let uid: u32 = text.trim().parse().context("runner: the run's user ID")?;
                    Some((uid, uid))
                }
            };
            // SAFETY: geteuid has no preconditions.
            if ids.is_some() && unsafe { libc::geteuid() } != 0 {
                bail!(
                    "cannot run the container as another user: the runner is not root (use sudo, or container_user = \"runner\")"
                );
            }
            let mut cmd = Command::new(&spec.command[0]);
            // Nothing of the runner's own environment (an SSH session's, or on loopback the
            // host's) reaches the container but a plain PATH and the VM root marker.
            cmd.env_clear().env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            );
            if let Some(root) = std::env::var_os(VM_ROOT_ENV) {
                cmd.env(VM_ROOT_ENV, root);
            }
            cmd.args(&spec.command[1..]).envs(&spec.env);
            let root = vm_root();
            // Its own directory, entered by it alone, and its HOME even when it works
            // elsewhere. `work/` itself can be crossed but not listed.
            let own = work_dir().join(&spec.id);
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(work_dir())?;
            std::fs::set_permissions(
                work_dir(),
                std::os::unix::fs::PermissionsExt::from_mode(0o711),
            )?;
            match std::fs::DirBuilder::new().mode(0o700).create(&own) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e.into()),
                _ => {}
            }
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(&own, Some(uid), Some(gid))?;
            }
            cmd.env("HOME", &own);
            let dir = match &workdir {
                Some(wd) => root.join(wd.trim_start_matches('/')),
                None => own,
            };
            if let Some((uid, gid)) = ids {
                // std drops the supplementary groups when a root parent switches users.
                cmd.uid(uid).gid(gid);
            }
            cmd.current_dir(dir);
            Ok(cmd)
        }
    }
}

/// A log file (0600): the container writes it through the descriptor it inherits.
fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The detached supervisor: holds `lock` (close-on-exec, so the container never holds it),
/// runs the container, writes `exit.json`.
fn supervise(id: &str, lock: File) -> anyhow::Result<i32> {
    valid_id(id)?;
    let dir = runs_dir().join(id);
    let spec: ContainerSpec = serde_json::from_slice(&std::fs::read(dir.join("spec.json"))?)?;
    let started_at_ms = now_ms();
    let record = match build_command(&spec).and_then(|mut cmd| {
        cmd.stdin(Stdio::null())
            .stdout(private_file(&dir.join("stdout"))?)
            .stderr(private_file(&dir.join("stderr"))?)
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
                started_at_ms: Some(started_at_ms),
                finished_at_ms: Some(now_ms()),
            }
        }
        Err(e) => ExitRecord {
            exit_code: 127,
            error: Some(format!("{e:#}")),
            started_at_ms: Some(started_at_ms),
            finished_at_ms: Some(now_ms()),
        },
    };
    write_atomically(&dir.join("exit.json"), &serde_json::to_vec(&record)?)?;
    drop(lock);
    notify_watchers(id);
    Ok(0)
}

/// Tells every `watch` that `id` changed. Best effort: a watcher that misses it finds the
/// change at its next rescan. Sockets nobody listens on any more are removed.
fn notify_watchers(id: &str) {
    let Ok(entries) = std::fs::read_dir(watch_dir()) else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    if socket.set_nonblocking(true).is_err() {
        return;
    }
    for entry in entries.flatten() {
        let path = entry.path();
        // Only sockets, never through a symlink: the directory is ours, its contents untrusted.
        let is_socket = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if path.extension().is_none_or(|e| e != "sock") || !is_socket {
            continue;
        }
        if let Err(e) = socket.send_to(id.as_bytes(), &path) {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// How often `watch` rescans every run directory, in case a notification was lost (or a
/// supervisor died without sending one: the run went stale).
const WATCH_RESCAN: Duration = Duration::from_secs(5);
/// How long `watch` stays silent before writing a heartbeat.
const WATCH_HEARTBEAT: Duration = Duration::from_secs(15);

/// Removes the watcher's socket when it stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams a snapshot, then every change, one JSON line each, until the reader goes away.
fn watch() -> anyhow::Result<i32> {
    let dir = watch_dir();
    private_dir(&dir)?;
    let path = dir.join(format!("{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path)
        .with_context(|| format!("runner watch: binding {}", path.display()))?;
    let _cleanup = SocketFile(path);
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut out = std::io::stdout().lock();
    let mut emit = |line: &WatchLine| -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        out.write_all(&bytes)?;
        out.flush()
    };
    let snapshot = list()?;
    let mut known: HashMap<String, RunEntry> = snapshot
        .containers
        .iter()
        .map(|e| (e.id.clone(), e.clone()))
        .collect();
    // A reader that went away shows up as a failed write: that ends the watch.
    if emit(&WatchLine::Snapshot(snapshot)).is_err() {
        return Ok(0);
    }
    let mut last_write = Instant::now();
    let mut last_scan = Instant::now();
    let broken_flag = vm_root().join(BROKEN_FLAG);
    let mut broken = broken_flag.exists();
    let mut buf = [0u8; 256];
    loop {
        // Checked every turn (at least twice a second): a broken node must stop getting work.
        if !broken && broken_flag.exists() {
            broken = true;
            if emit(&WatchLine::Broken).is_err() {
                return Ok(0);
            }
            last_write = Instant::now();
        }
        let mut changed: Vec<RunEntry> = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        match socket.recv(&mut buf) {
            Ok(n) => {
                if let Some(id) = std::str::from_utf8(&buf[..n])
                    .ok()
                    .filter(|id| valid_id(id).is_ok())
                {
                    match entry(&runs_dir().join(id), id) {
                        Some(e) => changed.push(e),
                        None => gone.push(id.to_string()),
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("runner watch: receiving"),
        }
        if last_scan.elapsed() >= WATCH_RESCAN {
            last_scan = Instant::now();
            if let Ok(now) = list() {
                let listed: std::collections::HashSet<&str> =
                    now.containers.iter().map(|e| e.id.as_str()).collect();
                gone.extend(
                    known
                        .keys()
                        .filter(|id| !listed.contains(id.as_str()))
                        .cloned(),
                );
                changed.extend(now.containers);
            }
        }
        for id in gone {
            if known.remove(&id).is_some() && emit(&WatchLine::Gone(id)).is_err() {
                return Ok(0);
            }
        }
        for e in changed {
            if known.get(&e.id) == Some(&e) {
                continue;
            }
            known.insert(e.id.clone(), e.clone());
            if emit(&WatchLine::Run(e)).is_err() {
                return Ok(0);
            }
            last_write = Instant::now();
        }
        if last_write.elapsed() >= WATCH_HEARTBEAT {
            if emit(&WatchLine::Heartbeat).is_err() {
                return Ok(0);
            }
            last_write = Instant::now();
        }
    }
}

/// Writes a finished run's result and both logs (each at most `cap` bytes) as one stream:
/// a `CollectHeader` line, then the stdout bytes, then the stderr bytes. Exit 3 when the run
/// has not finished.
fn collect(id: &str, cap: u64) -> anyhow::Result<i32> {
    valid_id(id)?;
    let dir = runs_dir().join(id);
    let Some(exit) = read_exit(&dir) else {
        eprintln!("runner collect: {id} has not finished");
        return Ok(3);
    };
    let open = |stream: &str| -> anyhow::Result<(Option<File>, LogPart)> {
        match File::open(dir.join(stream)) {
            Ok(f) => {
                let total = f.metadata()?.len();
                Ok((
                    Some(f),
                    LogPart {
                        sent: total.min(cap),
                        total,
                    },
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((None, LogPart { sent: 0, total: 0 }))
            }
            Err(e) => Err(e.into()),
        }
    };
    let (stdout_file, stdout) = open("stdout")?;
    let (stderr_file, stderr) = open("stderr")?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut header = serde_json::to_vec(&CollectHeader {
        exit,
        stdout,
        stderr,
    })?;
    header.push(b'\n');
    out.write_all(&header)?;
    for (file, part, name) in [
        (stdout_file, stdout, "stdout"),
        (stderr_file, stderr, "stderr"),
    ] {
        let Some(file) = file else { continue };
        let copied = std::io::copy(&mut file.take(part.sent), &mut out)?;
        if copied != part.sent {
            bail!("runner collect: {name} of {id} shrank while being sent");
        }
    }
    out.flush()?;
    Ok(0)
}

fn read_exit(dir: &Path) -> Option<ExitRecord> {
    std::fs::read(dir.join("exit.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The run in `dir`, or `None` when the directory is gone (forgotten meanwhile).
fn entry(dir: &Path, id: &str) -> Option<RunEntry> {
    let exited = |exit| RunEntry {
        id: id.to_string(),
        state: RunState::Exited,
        exit: Some(exit),
    };
    if let Some(exit) = read_exit(dir) {
        return Some(exited(exit));
    }
    let held = match File::open(dir.join("lock")) {
        Ok(f) => f.try_lock().is_err(),
        // No lock file: `start` is between creating the directory and locking it, unless the
        // directory is older than that takes — then it died there and nothing runs it.
        Err(_) => {
            let age = std::fs::metadata(dir)
                .and_then(|m| m.modified())
                .ok()?
                .elapsed()
                .unwrap_or_default();
            age < UNLOCKED_STALE_AFTER
        }
    };
    // The supervisor may have written exit.json between the two checks.
    if let Some(exit) = read_exit(dir) {
        return Some(exited(exit));
    }
    // A forget may have removed it meanwhile: no phantom run for a directory that is gone.
    if !dir.exists() {
        return None;
    }
    Some(RunEntry {
        id: id.to_string(),
        state: if held {
            RunState::Running
        } else {
            RunState::Stale
        },
        exit: None,
    })
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
        // Names that are not IDs (a run being forgotten is renamed to `.gone-ID`) are not runs.
        let Some(id) = d
            .file_name()
            .to_str()
            .filter(|name| valid_id(name).is_ok())
            .map(String::from)
        else {
            continue;
        };
        out.containers.extend(entry(&d.path(), &id));
    }
    out.containers.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Sends `signal` to the container's process group once; exit 0 when it is gone within 1 s.
fn kill(id: &str, signal: i32) -> anyhow::Result<i32> {
    valid_id(id)?;
    let dir = runs_dir().join(id);
    let gone = || entry(&dir, id).is_none_or(|e| e.state != RunState::Running);
    if gone() {
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
    match entry(&dir, id) {
        None => return Ok(0),
        Some(e) if e.state == RunState::Running => bail!("runner forget: {id} is still running"),
        Some(_) => {}
    }
    // Its user ID is freed below: nothing may still run as it, and no start may take it
    // meanwhile.
    let _lock = uid_lock(&runs_dir())?;
    let uid = std::fs::read_to_string(dir.join("uid"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|u| *u >= PER_RUN_UID_BASE);
    if let Some(uid) = uid {
        kill_uid(uid);
    }
    // Renamed first, in one step: a `list` or `watch` never sees it half-removed.
    let gone = runs_dir().join(format!(".gone-{id}"));
    std::fs::rename(&dir, &gone)?;
    // Its working directory goes first: its per-run user ID is free once `uid` is gone.
    match std::fs::remove_dir_all(work_dir().join(id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    std::fs::remove_dir_all(gone)?;
    notify_watchers(id);
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
                    started_at_ms: Some(1),
                    finished_at_ms: Some(2),
                }),
            }],
            broken: true,
        };
        let text = serde_json::to_string(&list).expect("json");
        assert_eq!(serde_json::from_str::<RunList>(&text).expect("parse"), list);
    }
}
