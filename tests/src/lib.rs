//! Helpers for the whole-system tests. These tests use what `cargo build --workspace` produced
//! (the `dispatch-cloud` binary, the driver `.so` files, the `loopback-cloud` daemon), so run
//! them through the README's test command, which builds first.

pub mod chaos;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatch_cloud::plugin::{self, Catalogue, InstanceSetEntry, LoadedPlugin};
use dispatch_cloud_loopback::protocol::{Request, SOCKET_NAME};
use driver_abi::InstanceSet;

/// `target/debug` (or whichever profile built this test).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>, or target/<profile>/<bin> for the chaos command.
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

pub fn built(file: &str) -> PathBuf {
    let path = target_dir().join(file);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests (the README's test command does)",
        path.display()
    );
    path
}

pub fn loopback_so() -> PathBuf {
    built("libdispatch_cloud_loopback.so")
}

pub fn probe_so() -> PathBuf {
    built("libdispatch_cloud_probe.so")
}

pub fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("read file"),
    ))
}

/// Runs the real `dispatch-cloud` binary.
pub fn cli(args: &[&str]) -> Output {
    Command::new(built("dispatch-cloud"))
        .args(args)
        .output()
        .expect("run dispatch-cloud")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until `done` holds, checking every 20 ms; panics naming `what` after `timeout`.
/// The one way these tests wait for a condition (never a bare sleep).
pub fn eventually(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `eventually` for async checks that produce a value: retries `attempt` until it returns
/// `Some`, or panics with `what` and the last `None`-making observation after `timeout`.
pub async fn eventually_async<T, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Where a failing test keeps its evidence: one file per test (tests run in parallel).
pub fn failure_log_path(kind: &str) -> PathBuf {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .replace("::", "-");
    PathBuf::from(format!("/tmp/dispatch-cloud-failed-{test}-{kind}.log"))
}

/// A loopback cloud in a temporary directory; its daemon is told to stop, and killed if it
/// does not, when this is dropped.
pub struct LoopbackCloud {
    pub dir: tempfile::TempDir,
}

impl LoopbackCloud {
    pub fn new() -> Self {
        // Short path: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("lbc")
            .tempdir_in("/tmp")
            .expect("temp dir");
        // A VM's root must be traversable like a real `/`: containers run as users of their
        // own and enter their working directories below it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod the cloud dir");
        }
        LoopbackCloud { dir }
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `parameters` table for an instance set on this cloud, with extra TOML lines.
    pub fn parameters_toml(&self, extra: &str) -> String {
        format!(
            "state_dir = {:?}\ndaemon_path = {:?}\nidle_exit_seconds = 120\n{extra}\n",
            self.state_dir().display().to_string(),
            built("loopback-cloud").display().to_string()
        )
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state_dir().join("daemon.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Asks the daemon to exit (VMs stay on disk) and waits until it has.
    pub fn stop_daemon(&self) {
        let pid = self.daemon_pid();
        if let Ok(mut s) = UnixStream::connect(self.state_dir().join(SOCKET_NAME)) {
            let mut line = serde_json::to_string(&Request::Shutdown).expect("json");
            line.push('\n');
            let _ = s.write_all(line.as_bytes());
            let mut reply = String::new();
            let _ = BufReader::new(s).read_line(&mut reply);
        }
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Path::new(&format!("/proc/{pid}")).exists() {
                if Instant::now() > deadline {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Default for LoopbackCloud {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for LoopbackCloud {
    fn drop(&mut self) {
        self.stop_daemon();
        // What loopback VMs of a failed test left running (detached runners) must not outlive it.
        dispatch_cloud_loopback::kill_vm_processes(self.state_dir(), true);
    }
}

/// Writes `plugins.toml` into `dir` and returns its path.
pub fn write_plugins_toml(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("plugins.toml");
    std::fs::write(&path, text).expect("write plugins.toml");
    path
}

/// The `[[plugins]]` entry of `name` at `so`, pinned by its hash.
pub fn pinned_plugin_entry(name: &str, so: &Path) -> String {
    format!(
        "[[plugins]]\nname = \"{name}\"\npath = {:?}\nsha256 = \"{}\"\n",
        so.display().to_string(),
        sha256_hex(so)
    )
}

/// The lifecycle steps `driver-test --skip-ssh` must pass for any driver.
pub const LIFECYCLE_STEPS: &[&str] = &[
    "PASS create an instance",
    "PASS new instance appears in the filtered list",
    "PASS tags round-trip",
    "PASS set_tags is seen by the next listing",
    "PASS destroy, and the instance disappears",
];

/// Runs `dispatch-cloud driver-test --skip-ssh` on instance set `set` of `plugins` (with
/// `env` set, or removed where `None`), asserts it passed every lifecycle step without
/// probing, and returns its output.
pub fn assert_driver_test_passes(
    plugins: &Path,
    set: &str,
    instance_type: &str,
    image: &str,
    env: &[(&str, Option<&std::ffi::OsStr>)],
) -> String {
    let mut command = Command::new(built("dispatch-cloud"));
    command.args([
        "driver-test".as_ref(),
        "--plugins".as_ref(),
        plugins.as_os_str(),
        "--instance-set".as_ref(),
        set.as_ref(),
        "--instance-type".as_ref(),
        instance_type.as_ref(),
        "--image".as_ref(),
        image.as_ref() as &std::ffi::OsStr,
        "--skip-ssh".as_ref(),
    ]);
    for (k, v) in env {
        match v {
            Some(v) => command.env(k, v),
            None => command.env_remove(k),
        };
    }
    let out = command.output().expect("run driver-test");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for step in LIFECYCLE_STEPS {
        assert!(stdout.contains(step), "{step:?} missing:\n{stdout}");
    }
    assert!(
        !stdout.contains("boot probe"),
        "--skip-ssh still probed:\n{stdout}"
    );
    stdout
}

/// A driver's real `.so` loaded from a catalogue written to a temporary directory.
pub struct DriverUnderTest {
    pub dir: tempfile::TempDir,
    pub catalogue: Catalogue,
    pub loaded: LoadedPlugin,
}

impl DriverUnderTest {
    /// Writes `text` as `plugins.toml` and loads the plugin `driver` from it.
    pub fn load(text: &str, driver: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        Self::load_in(dir, text, driver)
    }

    /// The same in `dir` (when the catalogue names files there).
    pub fn load_in(dir: tempfile::TempDir, text: &str, driver: &str) -> Self {
        let file = write_plugins_toml(dir.path(), text);
        let catalogue = Catalogue::load(&file).expect("catalogue");
        let loaded = plugin::load(catalogue.plugin(driver).expect("entry")).expect("the .so loads");
        assert_eq!(loaded.driver_name, driver);
        DriverUnderTest {
            dir,
            catalogue,
            loaded,
        }
    }

    pub fn open(&self, set: &str) -> Arc<dyn InstanceSet> {
        Arc::from(self.open_result(set).expect("instance set"))
    }

    /// The error opening `set` gives (panics if it opens).
    pub fn open_err(&self, set: &str) -> driver_abi::DriverError {
        match self.open_result(set) {
            Ok(_) => panic!("instance set {set} opened"),
            Err(e) => e,
        }
    }

    fn open_result(&self, set: &str) -> Result<Box<dyn InstanceSet>, driver_abi::DriverError> {
        self.loaded.new_instance_set(
            self.catalogue.instance_set(set).expect("set"),
            &driver_abi::Tags::new(),
        )
    }
}

/// How long a `RateLimit` error asks to wait from now (panics on any other error).
pub fn rate_limit_wait(e: &driver_abi::DriverError) -> Duration {
    match e {
        driver_abi::DriverError::RateLimit { earliest_retry, .. } => earliest_retry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
        other => panic!("not a rate limit: {other:?}"),
    }
}

/// A fresh OpenSSH ed25519 public key line.
pub fn test_public_key() -> String {
    dispatch_cloud::ssh::generate_key()
        .expect("key")
        .public_key()
        .to_openssh()
        .expect("openssh")
}

/// A catalogue with the loopback plugin and one instance set `name` on `cloud`.
pub fn loopback_catalogue_text(cloud: &LoopbackCloud, set_id: &str, extra_params: &str) -> String {
    format!(
        "[[plugins]]\nname = \"loopback\"\npath = {:?}\n\n[[instance_sets]]\nname = \"test\"\ndriver = \"loopback\"\nset_id = \"{set_id}\"\n[instance_sets.parameters]\n{}",
        loopback_so().display().to_string(),
        cloud.parameters_toml(extra_params)
    )
}

/// Loads the loopback plugin in this process and opens instance set `test` on `cloud`.
pub fn loopback_set(
    cloud: &LoopbackCloud,
    set_id: &str,
    extra_params: &str,
) -> (LoadedPlugin, InstanceSetEntry, Arc<dyn InstanceSet>) {
    let file = write_plugins_toml(
        cloud.state_dir(),
        &loopback_catalogue_text(cloud, set_id, extra_params),
    );
    let catalogue = Catalogue::load(&file).expect("catalogue");
    let loaded = plugin::load(catalogue.plugin("loopback").expect("plugin entry")).expect("load");
    let entry = catalogue.instance_set("test").expect("set").clone();
    let set = loaded
        .new_instance_set(&entry, &Default::default())
        .expect("instance set");
    (loaded, entry, Arc::from(set))
}

static FIXTURE_BUILD: Mutex<()> = Mutex::new(());

/// Runs `cargo <subcommand>` on a crate outside the workspace, in `target/fixtures` (the
/// workspace's own target directory is locked while tests run); panics with cargo's output.
pub fn cargo_on(manifest: &Path, subcommand: &str) {
    let _one_at_a_time = FIXTURE_BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .arg(subcommand)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(fixtures_target())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {subcommand} of {} failed:\n{}",
        manifest.display(),
        text(&out.stderr)
    );
}

/// Where crates outside the workspace are built.
pub fn fixtures_target() -> PathBuf {
    workspace_root().join("target/fixtures")
}

/// Builds a fixture crate that lives outside the workspace, as its author would, and returns
/// its `.so`.
pub fn build_fixture(crate_dir: &str, library: &str) -> PathBuf {
    let manifest = workspace_root()
        .join("tests/fixtures")
        .join(crate_dir)
        .join("Cargo.toml");
    cargo_on(&manifest, "build");
    let so = fixtures_target().join("debug").join(library);
    assert!(so.exists(), "{} not produced", so.display());
    so
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after the last ')';
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64
        / if per_second > 0 {
            per_second as f64
        } else {
            100.0
        }
}

/// The most resident memory a process ever had, in KiB.
pub fn peak_rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A `dispatch-cloud serve` process on a loopback cloud of its own, with compressed timeouts.
/// Killed (and its cloud stopped) when dropped.
pub struct ServeHarness {
    pub cloud: LoopbackCloud,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub token: String,
    config_file: PathBuf,
    child: Option<std::process::Child>,
    executable: Option<PathBuf>,
}

/// Three loopback instance types: small (2 vCPUs, 2 GiB, $0.02/h), medium (4, 8 GiB, $0.06/h)
/// and large (8, 16 GiB, $0.08/h).
pub const THREE_TYPES: &str = r#"
[[instance_types]]
name = "small"
provider_type = "lb.small"
vcpus = 2
ram = "2GiB"
price = 0.02
[[instance_types]]
name = "medium"
provider_type = "lb.medium"
vcpus = 4
ram = "8GiB"
price = 0.06
[[instance_types]]
name = "large"
provider_type = "lb.large"
vcpus = 8
ram = "16GiB"
price = 0.08
"#;

/// GET `path` with `token`; the JSON answer, whatever its status.
pub fn get_json(url: &str, path: &str, token: &str) -> serde_json::Value {
    let response = match ureq::get(&format!("{url}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {path}: {e}"),
    };
    serde_json::from_str(&response.into_string().expect("body")).expect("JSON")
}

/// One loopback instance type (2 vCPUs, 2 GiB, $0.25/h), for tests that need a VM but no
/// choice of size.
pub const ONE_SMALL_TYPE: &str = r#"
[[instance_types]]
name = "small"
provider_type = "lb.small"
vcpus = 2
ram = "2GiB"
price = 0.25
"#;

/// Cluster config with timeouts compressed from minutes into fractions of a second
/// (`idle_seconds` is added by the harness).
pub const FAST_CLUSTER_CONFIG: &str = r#"
tokens = ["test-token"]
[timeouts]
probe_interval_seconds = 0.1
sync_interval_seconds = 0.5
booting_seconds = 60
probe_seconds = 20
shutdown_seconds = 0.5
signal_seconds = 0.1
term_seconds = 5
stale_lock_seconds = 10
quota_holdoff_seconds = 0.5
capacity_holdoff_seconds = 0.5
[limits]
max_cloud_ops_per_second = 200
max_probes_per_second = 500
max_concurrent_instance_create_ops = 8
maximum_price_factor = 1.5
max_dispatch_attempts = 50
"#;

/// How a `ServeHarness` is set up; `Default` is the loopback cloud with the built binary as
/// the VMs' runner.
#[derive(Clone, Debug)]
pub struct HarnessOptions {
    /// Appended to the cluster config (e.g. `[[instance_types]]` tables).
    pub cluster_extra: String,
    /// Appended to the loopback instance set's parameters (e.g. a faults table).
    pub loopback_extra: String,
    /// Deploy the host's executable to VMs by hash, as production does.
    pub deploy: bool,
    pub idle_seconds: f64,
    pub max_dispatch_attempts: u32,
    /// The runner on VMs (overrides `deploy`).
    pub runner_path: Option<PathBuf>,
    /// A whole `plugins.toml` with an instance set named `test`, instead of loopback's.
    pub catalogue: Option<String>,
    pub probe_interval_seconds: f64,
    pub sync_interval_seconds: f64,
    /// Lines added to the `[limits]` table.
    pub limits_extra: String,
    /// Lines added to the `[timeouts]` table.
    pub timeouts_extra: String,
    /// Top-level keys added before any table (e.g. `management_tokens = […]`).
    pub top_extra: String,
    /// Run `serve` from this executable instead of the built one.
    pub executable: Option<PathBuf>,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            cluster_extra: String::new(),
            loopback_extra: String::new(),
            deploy: false,
            idle_seconds: 1.5,
            max_dispatch_attempts: 50,
            runner_path: None,
            catalogue: None,
            probe_interval_seconds: 0.1,
            sync_interval_seconds: 0.5,
            limits_extra: String::new(),
            timeouts_extra: String::new(),
            top_extra: String::new(),
            executable: None,
        }
    }
}

impl ServeHarness {
    /// `cluster_extra` is appended to the cluster config (e.g. `[[instance_types]]` tables);
    /// `loopback_extra` to the instance set's parameters. VMs use the built binary as their
    /// runner (loopback VMs share this machine) unless `deploy` asks for real deployment.
    pub fn start(cluster_extra: &str, loopback_extra: &str) -> Self {
        Self::start_with(cluster_extra, loopback_extra, false)
    }

    pub fn start_with(cluster_extra: &str, loopback_extra: &str, deploy: bool) -> Self {
        Self::start_full(cluster_extra, loopback_extra, deploy, 1.5)
    }

    pub fn start_full(
        cluster_extra: &str,
        loopback_extra: &str,
        deploy: bool,
        idle_seconds: f64,
    ) -> Self {
        Self::start_opts(HarnessOptions {
            cluster_extra: cluster_extra.into(),
            loopback_extra: loopback_extra.into(),
            deploy,
            idle_seconds,
            ..HarnessOptions::default()
        })
    }

    pub fn start_opts(opts: HarnessOptions) -> Self {
        let cloud = LoopbackCloud::new();
        let dir = tempfile::Builder::new()
            .prefix("dcs")
            .tempdir_in("/tmp")
            .expect("tmp");
        // Containers run as users of their own (container_user = per-run) and write marker
        // files here, like /tmp: anyone may create, nobody may remove another's. `state/`
        // inside is made 0700 by serve itself.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
                .expect("chmod the test dir");
            // The file tests' containers append a line to per run (`runs.log`), open to all.
            let runs = dir.path().join("runs.log");
            std::fs::write(&runs, b"").expect("runs.log");
            std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o666))
                .expect("chmod runs.log");
        }
        let catalogue = opts.catalogue.clone().unwrap_or_else(|| {
            loopback_catalogue_text(&cloud, "zzzzz-zzzzz-servetest000000", &opts.loopback_extra)
        });
        let plugins = write_plugins_toml(dir.path(), &catalogue);
        let runner = match (&opts.runner_path, opts.deploy) {
            (Some(path), _) => format!("runner_path = {:?}\n", path.display().to_string()),
            (None, true) => String::new(),
            (None, false) => {
                format!(
                    "runner_path = {:?}\n",
                    built("dispatch-cloud-runner").display().to_string()
                )
            }
        };
        let fast = FAST_CLUSTER_CONFIG
            .replace(
                "[timeouts]\n",
                &format!(
                    "[timeouts]\nidle_seconds = {}\n{}\n",
                    opts.idle_seconds, opts.timeouts_extra
                ),
            )
            .replace(
                "max_dispatch_attempts = 50",
                &format!("max_dispatch_attempts = {}", opts.max_dispatch_attempts),
            )
            .replace(
                "probe_interval_seconds = 0.1",
                &format!("probe_interval_seconds = {}", opts.probe_interval_seconds),
            )
            .replace(
                "sync_interval_seconds = 0.5",
                &format!("sync_interval_seconds = {}", opts.sync_interval_seconds),
            )
            .replace("[limits]\n", &format!("[limits]\n{}\n", opts.limits_extra));
        let config_file = dir.path().join("cluster.toml");
        // Port 0: serve binds a free port itself and writes it to `<state>/api-address`, so
        // parallel tests never race for one.
        std::fs::write(
            &config_file,
            format!(
                "state_dir = {:?}\nlisten = \"127.0.0.1:0\"\nplugins = {:?}\ninstance_set = \"test\"\n{}\n{runner}{fast}\n{}\n",
                dir.path().join("state").display().to_string(),
                plugins.display().to_string(),
                opts.top_extra,
                opts.cluster_extra,
            ),
        )
        .expect("write config");
        let mut h = ServeHarness {
            cloud,
            dir,
            url: String::new(),
            token: "test-token".into(),
            config_file,
            child: None,
            executable: opts.executable.clone(),
        };
        h.spawn();
        h
    }

    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// The serve process's PID, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Starts (or restarts) the serve process and waits until its API answers.
    pub fn spawn(&mut self) {
        let address_file = self.dir.path().join("state/api-address");
        // A previous run's address must not be mistaken for this one's.
        let _ = std::fs::remove_file(&address_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("serve.log"))
            .expect("log");
        let executable = self
            .executable
            .clone()
            .unwrap_or_else(|| built("dispatch-cloud"));
        let child = Command::new(executable)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_file)
            .env(
                "RUST_LOG",
                std::env::var("DISPATCH_CLOUD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start serve");
        self.child = Some(child);
        let log_path = self.dir.path().join("serve.log");
        eventually(
            "serve to write its address",
            Duration::from_secs(30),
            || match std::fs::read_to_string(&address_file) {
                Ok(a) if !a.trim().is_empty() => {
                    self.url = format!("http://{}", a.trim());
                    true
                }
                _ => {
                    let exited = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    assert!(
                        exited.is_none(),
                        "serve exited ({exited:?}); log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    false
                }
            },
        );
        eventually("serve's API to answer", Duration::from_secs(30), || {
            self.client().list().is_ok()
        });
    }

    /// SIGTERM, as systemd stops it; waits up to `within` for the exit and returns how long
    /// it took.
    pub fn terminate(&mut self, within: Duration) -> Duration {
        let mut child = self.child.take().expect("serve is running");
        let pid = i32::try_from(child.id()).expect("pid");
        let sent = Instant::now();
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let exited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually("serve to exit after SIGTERM", within, || {
                matches!(child.try_wait(), Ok(Some(_)))
            })
        }));
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve did not exit within {within:?} of SIGTERM");
        }
        sent.elapsed()
    }

    /// Waits (up to `timeout`) until container `id` is in `state`.
    pub fn wait_for_state(
        &self,
        id: &str,
        state: dispatch_cloud::queue::ContainerState,
        timeout: Duration,
    ) {
        self.wait_for(&format!("container {id} to be {state:?}"), timeout, || {
            self.client().get(id).is_ok_and(|c| c.state == state)
        });
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn client(&self) -> dispatch_cloud::client::Client {
        dispatch_cloud::client::Client::new(&self.url, &self.token)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// `eventually`, with the serve log's tail when it times out.
    pub fn wait_for(&self, what: &str, timeout: Duration, done: impl FnMut() -> bool) {
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(what, timeout, done)
        }));
        if let Err(e) = waited {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "{}; serve log tail:\n{}",
                e.downcast_ref::<String>().cloned().unwrap_or_default(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

impl Drop for ServeHarness {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Keep the evidence: the temporary directory goes away with the harness.
            let kept = failure_log_path("serve");
            let _ = std::fs::copy(self.dir.path().join("serve.log"), &kept);
            eprintln!("serve log kept in {}", kept.display());
        }
    }
}

/// A `moto_server` (the EC2 emulator from PyPI) on a free port of 127.0.0.1, killed on drop.
/// It comes from the virtual environment the README's test command creates in `.venv/`
/// (or `$MOTO_SERVER`).
pub struct MotoServer {
    child: std::process::Child,
    pub endpoint: String,
}

impl MotoServer {
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// With extra environment, e.g. `INITIAL_NO_AUTH_ACTION_COUNT`: after that many requests
    /// moto checks every signature and IAM permission.
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        let program = std::env::var("MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join(".venv/bin/moto_server"));
        assert!(
            program.exists(),
            "{} is missing: run the README's test command, which installs moto into .venv/",
            program.display()
        );
        // Port 0: moto binds a free port itself and prints it, so parallel tests never race.
        let mut child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start moto_server");
        let stderr = child.stderr.take().expect("moto stderr");
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        // Reads the port from the start-up banner, then keeps draining the request log so
        // moto never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("Running on http://127.0.0.1:")
                    .nth(1)
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    let _ = port_tx.send(port);
                }
            }
        });
        match port_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(port) => MotoServer {
                child,
                endpoint: format!("http://127.0.0.1:{port}/"),
            },
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("moto_server did not report its port: {e}");
            }
        }
    }

    /// Calls `action` (for what the driver does not do: subnets, attributes) and returns the
    /// response XML. Unsigned: moto does not check signatures.
    pub fn call(&self, action: &str, params: &[(&str, &str)]) -> String {
        let mut form: Vec<(&str, &str)> = vec![("Action", action), ("Version", "2016-11-15")];
        form.extend_from_slice(params);
        match ureq::post(&self.endpoint)
            .set("Authorization", "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0")
            .send_form(&form)
        {
            Ok(r) => r.into_string().expect("body"),
            Err(e) => panic!("{action}: {e}"),
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of the first `<tag>…</tag>` in `xml`.
pub fn xml_value(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].to_string())
}

/// An in-repo cloud fake (`tests/fakes/*.py`, standard-library Python) on a free port of
/// 127.0.0.1. It exits when its stdin closes, so even a test that dies without running `Drop`
/// leaves nothing behind; `Drop` kills it as well. Its `/fake/` controls take faults and hand
/// out the request log.
pub struct FakeCloud {
    child: std::process::Child,
    /// Where the driver points its `endpoint`.
    pub endpoint: String,
    /// Where the controls answer (plain HTTP).
    control: String,
}

impl FakeCloud {
    fn start(script: &str, args: &[&std::ffi::OsStr]) -> Self {
        let mut child = Command::new("python3")
            .arg(workspace_root().join("tests/fakes").join(script))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start python3 tests/fakes/{script}: {e}"));
        let stdout = child.stdout.take().expect("fake stdout");
        let mut lines = BufReader::new(stdout).lines();
        let endpoint = lines
            .next()
            .and_then(Result::ok)
            .and_then(|l| l.strip_prefix("listening on ").map(str::to_string));
        let Some(endpoint) = endpoint else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} did not report its address");
        };
        let control = if endpoint.starts_with("https://") {
            lines
                .next()
                .and_then(Result::ok)
                .and_then(|l| l.strip_prefix("control on ").map(str::to_string))
                .unwrap_or_else(|| panic!("{script} did not report its control address"))
        } else {
            endpoint.clone()
        };
        FakeCloud {
            child,
            endpoint,
            control,
        }
    }

    fn control(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        match ureq::post(&format!("{}/fake/{path}", self.control)).send_json(body) {
            Ok(r) => r.into_json().expect("fake control reply"),
            Err(e) => panic!("fake control {path}: {e}"),
        }
    }

    fn fetch(&self, path: &str) -> Vec<serde_json::Value> {
        match ureq::get(&format!("{}/fake/{path}", self.control)).call() {
            Ok(r) => r.into_json().expect("fake reply"),
            Err(e) => panic!("fake {path}: {e}"),
        }
    }

    /// Every cloud request so far: `method`, `path`, `query`, `body`, `authorized`, `status`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.fetch("requests")
    }

    /// Queues a fault: the next call matching `method` and the `path` regex gets `fault`'s
    /// `respond` (an HTTP answer) or an operation that ends with its `operation_error` (GCE)
    /// or `async_error` (Azure).
    pub fn inject(&self, method: &str, path: &str, fault: serde_json::Value) {
        let mut spec = serde_json::json!({"match": {"method": method, "path": path}});
        if let (Some(spec), Some(fault)) = (spec.as_object_mut(), fault.as_object()) {
            spec.extend(fault.clone());
        }
        self.control("inject", spec);
    }
}

impl Drop for FakeCloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The EC2 instance metadata service, IMDSv2 (`tests/fakes/imds.py`).
pub struct ImdsFake(FakeCloud);

impl std::ops::Deref for ImdsFake {
    type Target = FakeCloud;
    fn deref(&self) -> &FakeCloud {
        &self.0
    }
}

impl ImdsFake {
    pub fn start() -> Self {
        ImdsFake(FakeCloud::start("imds.py", &[]))
    }

    /// The role credentials handed out from now on, valid for `expires_in` seconds.
    pub fn serve_credentials(&self, key: &str, secret: &str, expires_in: f64) {
        self.control(
            "credentials",
            serde_json::json!({
                "AccessKeyId": key,
                "SecretAccessKey": secret,
                "expires_in": expires_in,
            }),
        );
    }

    /// How many times the role's credentials were asked for.
    pub fn credential_fetches(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                r["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/security-credentials/dispatch-cloud-test-role"))
            })
            .count()
    }
}

/// AWS STS's `AssumeRoleWithWebIdentity` (`tests/fakes/sts.py`).
pub struct StsFake(FakeCloud);

impl std::ops::Deref for StsFake {
    type Target = FakeCloud;
    fn deref(&self) -> &FakeCloud {
        &self.0
    }
}

impl StsFake {
    pub fn start() -> Self {
        StsFake(FakeCloud::start("sts.py", &[]))
    }

    /// Accept `token` from now on and hand out these keys, valid for `expires_in` seconds.
    pub fn serve_credentials(&self, token: &str, key: &str, secret: &str, expires_in: f64) {
        self.control(
            "credentials",
            serde_json::json!({
                "token": token,
                "AccessKeyId": key,
                "SecretAccessKey": secret,
                // The keys are a moto IAM user's, which moto checks without a session token
                // (it refuses an unknown one); STS's own tokens are not moto's to check.
                "SessionToken": "",
                "expires_in": expires_in,
            }),
        );
    }
}

/// The GCE Compute fake (`tests/fakes/gce_compute.py`): zone operations take 0.2 s from
/// PENDING to DONE; the test service account's JWTs (`service_account_file`) are accepted.
pub struct GceFake(FakeCloud);

impl std::ops::Deref for GceFake {
    type Target = FakeCloud;
    fn deref(&self) -> &FakeCloud {
        &self.0
    }
}

impl GceFake {
    pub fn start() -> Self {
        let account = workspace_root().join("tests/fixtures/gce/service-account-public.json");
        GceFake(FakeCloud::start(
            "gce_compute.py",
            &[
                "--operation-delay".as_ref(),
                "0.2".as_ref(),
                "--service-account-public".as_ref(),
                account.as_os_str(),
            ],
        ))
    }

    /// An `authorized_user` credentials file whose refresh token the fake's token endpoint
    /// honours (`good = false`: one it refuses).
    pub fn credentials_file(&self, dir: &Path, good: bool) -> PathBuf {
        let refresh = if good {
            "fake-refresh-token"
        } else {
            "revoked-token"
        };
        let json = serde_json::json!({
            "type": "authorized_user",
            "client_id": "fake-client-id.apps.googleusercontent.com",
            "client_secret": "fake-client-secret",
            "refresh_token": refresh,
            "token_uri": format!("{}/token", self.endpoint),
        });
        let path = dir.join(if good {
            "gce-credentials.json"
        } else {
            "gce-revoked.json"
        });
        std::fs::write(&path, json.to_string()).expect("write credentials");
        path
    }

    /// A service-account key file (a test-only key) whose self-signed JWTs the fake accepts.
    pub fn service_account_file(&self) -> PathBuf {
        workspace_root().join("tests/fixtures/gce/service-account.json")
    }

    /// Every instance the fake holds, in Compute's JSON form.
    pub fn instances(&self) -> Vec<serde_json::Value> {
        self.fetch("instances")
    }

    /// Publishes guest attributes (`namespace`, `key`, `value` items) for an instance.
    pub fn guest_attributes(
        &self,
        project: &str,
        zone: &str,
        instance: &str,
        items: serde_json::Value,
    ) {
        self.control(
            "guest-attributes",
            serde_json::json!({"project": project, "zone": zone, "instance": instance, "items": items}),
        );
    }

    /// Another writer changes `instance`'s metadata right after its next read.
    pub fn race_metadata(&self, instance: &str) {
        self.control("race-metadata", serde_json::json!({"instance": instance}));
    }
}

/// The ARM fake (`tests/fakes/azure_arm.py`) over HTTPS with the test CA
/// (`tests/fixtures/tls/`); operations take 0.3 s.
pub struct AzureFake(FakeCloud);

impl std::ops::Deref for AzureFake {
    type Target = FakeCloud;
    fn deref(&self) -> &FakeCloud {
        &self.0
    }
}

impl AzureFake {
    pub fn start() -> Self {
        let tls = workspace_root().join("tests/fixtures/tls");
        let (cert, key) = (tls.join("server.pem"), tls.join("server-key.pem"));
        AzureFake(FakeCloud::start(
            "azure_arm.py",
            &[
                "--cert".as_ref(),
                cert.as_os_str(),
                "--key".as_ref(),
                key.as_os_str(),
                "--operation-delay".as_ref(),
                "0.3".as_ref(),
            ],
        ))
    }

    /// The CA that signed the fake's certificate, for the driver's `ca_certificate_file`.
    pub fn ca_file(&self) -> PathBuf {
        workspace_root().join("tests/fixtures/tls/ca.pem")
    }

    /// Every resource the fake holds (VMs, NICs, disks), in ARM's JSON form.
    pub fn resources(&self) -> Vec<serde_json::Value> {
        self.fetch("resources")
    }

    /// Changes `page_size` (list pages) or `nic_ip_delay` (seconds before a new NIC's IP shows).
    pub fn configure(&self, settings: serde_json::Value) {
        self.control("config", settings);
    }

    /// A NIC (`kind = "nic"`) or disk (`"disk"`) named `name` with `tags`, `age` seconds old
    /// and no VM.
    pub fn orphan(&self, kind: &str, name: &str, age: u64, tags: serde_json::Value) {
        self.control(
            "orphan",
            serde_json::json!({"kind": kind, "name": name, "age": age, "tags": tags}),
        );
    }
}
