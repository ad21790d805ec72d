//! The cloud: its VMs, their records on disk, and the faults applied to each request.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dispatch_cloud_loopback::kill_vm_processes;
use dispatch_cloud_loopback::protocol::{
    ErrorKind, Faults, Request, Response, VmInfo, VmState, WireError, VM_ROOT_ENV,
};
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::sshd::VmShell;

/// The runner's broken-node flag, relative to the VM root; deleted at create, written when a
/// `broken_after_ms` fault fires.
const BROKEN_FLAG: &str = "var/lib/dispatch-cloud/broken";

/// What the daemon remembers of a VM across restarts (`vms/<id>/vm.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct VmRecord {
    id: String,
    provider_type: String,
    image_id: String,
    quota_group: String,
    tags: BTreeMap<String, String>,
    port: u16,
    public_key: Option<String>,
    init_command: String,
    init_done: bool,
    boot_at_unix_ms: i64,
    crash_at_unix_ms: Option<i64>,
    broken_at_unix_ms: Option<i64>,
    crashed: bool,
}

struct Vm {
    record: VmRecord,
    host_key: String,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct CloudState {
    vms: HashMap<String, Vm>,
    last_create: Option<Instant>,
    last_list: Option<Instant>,
    next_serial: u64,
}

pub struct Cloud {
    dir: PathBuf,
    /// A std mutex: no lock is held across an await.
    state: Mutex<CloudState>,
    /// Held from a record's change until it is on disk, so that two changes to one VM (its tags
    /// and its boot finishing) are written in the order they were made, never the older last.
    record_writes: Mutex<()>,
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A tokio instant for a wall-clock time in ms (the past maps to now).
fn instant_at(unix_ms: i64) -> tokio::time::Instant {
    let wait = unix_ms.saturating_sub(now_ms()).max(0);
    tokio::time::Instant::now() + Duration::from_millis(wait.unsigned_abs())
}

fn err(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(WireError::new(kind, message))
}

/// A capacity fault for `scope`, a provider type or a quota group as `kind` says.
fn capacity_error(kind: ErrorKind, scope: String) -> Response {
    let mut e = WireError::new(kind, format!("insufficient capacity for {scope}"));
    e.scope = Some(scope);
    Response::Error(e)
}

fn rate_limited(last: Option<Instant>, interval_ms: u64, what: &str) -> Option<Response> {
    let interval = Duration::from_millis(interval_ms);
    let last = last?;
    let since = last.elapsed();
    if interval_ms == 0 || since >= interval {
        return None;
    }
    let wait = interval - since;
    let mut e = WireError::new(
        ErrorKind::RateLimit,
        format!("{what} rate limit: one call per {interval_ms} ms"),
    );
    e.earliest_retry_unix_ms = Some(now_ms() + i64::try_from(wait.as_millis()).unwrap_or(0));
    Some(Response::Error(e))
}

impl Cloud {
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Cloud {
            dir,
            state: Mutex::new(CloudState::default()),
            record_writes: Mutex::new(()),
        })
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.dir.join("vms").join(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CloudState> {
        // A panic while holding the lock would be a daemon bug; the state itself stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn vm_count(&self) -> usize {
        self.lock().vms.len()
    }

    /// Brings back every VM recorded on disk, on the same port with the same host key.
    pub async fn reload(self: &Arc<Self>) -> std::io::Result<()> {
        let vms_dir = self.dir.join("vms");
        std::fs::create_dir_all(&vms_dir)?;
        for entry in std::fs::read_dir(&vms_dir)? {
            let dir = entry?.path();
            let record: VmRecord = match std::fs::read(dir.join("vm.json"))
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    log::error!("Skipping VM directory {}: {e}", dir.display());
                    continue;
                }
            };
            let key = match PrivateKey::read_openssh_file(dir.join("host_key")) {
                Ok(k) => k,
                Err(e) => {
                    log::error!("Skipping VM {}: host key: {e}", record.id);
                    continue;
                }
            };
            let listener = match TcpListener::bind(("127.0.0.1", record.port)).await {
                Ok(l) => Some(l),
                Err(e) => {
                    log::error!("vm={} cannot rebind port {}: {e}", record.id, record.port);
                    None
                }
            };
            let serial = record
                .id
                .rsplit('-')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            self.start_vm(record, key, listener);
            let mut st = self.lock();
            st.next_serial = st.next_serial.max(serial + 1);
        }
        log::info!(
            "Reloaded {} VMs from {}.",
            self.vm_count(),
            vms_dir.display()
        );
        Ok(())
    }

    fn start_vm(
        self: &Arc<Self>,
        record: VmRecord,
        key: PrivateKey,
        listener: Option<TcpListener>,
    ) {
        let host_key = key.public_key().to_openssh().unwrap_or_default();
        let task = match listener {
            Some(l) => tokio::spawn(run_vm(Arc::clone(self), record.clone(), key, l)),
            // No port: the VM is as good as crashed.
            None => tokio::spawn(async {}),
        };
        self.lock().vms.insert(
            record.id.clone(),
            Vm {
                record,
                host_key,
                task,
            },
        );
    }

    fn save(&self, record: &VmRecord) -> std::io::Result<()> {
        let dir = self.vm_dir(&record.id);
        let tmp = dir.join("vm.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
        std::fs::rename(tmp, dir.join("vm.json"))
    }

    fn update<F: FnOnce(&mut VmRecord)>(&self, id: &str, f: F) {
        let _writing = self
            .record_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = {
            let mut st = self.lock();
            let Some(vm) = st.vms.get_mut(id) else { return };
            f(&mut vm.record);
            vm.record.clone()
        };
        if let Err(e) = self.save(&record) {
            log::error!("vm={id} cannot save its record: {e}");
        }
    }

    fn info(&self, vm: &Vm) -> VmInfo {
        let state = if vm.record.crashed {
            VmState::Crashed
        } else if now_ms() < vm.record.boot_at_unix_ms || !vm.record.init_done {
            VmState::Booting
        } else {
            VmState::Running
        };
        VmInfo {
            id: vm.record.id.clone(),
            provider_type: vm.record.provider_type.clone(),
            image_id: vm.record.image_id.clone(),
            tags: vm.record.tags.clone(),
            address: format!("127.0.0.1:{}", vm.record.port),
            host_key: vm.host_key.clone(),
            state,
            root: self
                .vm_dir(&vm.record.id)
                .join("root")
                .display()
                .to_string(),
        }
    }

    pub async fn handle(self: &Arc<Self>, request: Request) -> Response {
        match request {
            Request::Ping => Response::Pong {
                pid: std::process::id(),
                vms: self.vm_count(),
            },
            Request::Create {
                provider_type,
                image_id,
                quota_group,
                tags,
                init_command,
                public_key,
                faults,
            } => {
                self.create(
                    provider_type,
                    image_id,
                    quota_group,
                    tags,
                    init_command,
                    public_key,
                    &faults,
                )
                .await
            }
            Request::List { faults } => {
                let mut st = self.lock();
                if let Some(limited) = rate_limited(st.last_list, faults.list_rate_limit_ms, "list")
                {
                    return limited;
                }
                st.last_list = Some(Instant::now());
                let mut vms: Vec<VmInfo> = st.vms.values().map(|vm| self.info(vm)).collect();
                vms.sort_by(|a, b| a.id.cmp(&b.id));
                Response::Vms(vms)
            }
            Request::SetTags { id, tags } => {
                if !self.lock().vms.contains_key(&id) {
                    return err(ErrorKind::NotFound, format!("no VM {id}"));
                }
                self.update(&id, |r| r.tags = tags);
                Response::Ok
            }
            Request::Destroy { id, faults } => self.destroy(&id, &faults),
            Request::Shutdown => Response::Ok,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create(
        self: &Arc<Self>,
        provider_type: String,
        image_id: String,
        quota_group: String,
        tags: BTreeMap<String, String>,
        init_command: String,
        public_key: Option<String>,
        faults: &Faults,
    ) -> Response {
        if let Some(Err(e)) = public_key.as_deref().map(PublicKey::from_openssh) {
            return err(ErrorKind::BadRequest, format!("public key: {e}"));
        }
        let serial = {
            let mut st = self.lock();
            if let Some(limited) =
                rate_limited(st.last_create, faults.create_rate_limit_ms, "create")
            {
                return limited;
            }
            st.last_create = Some(Instant::now());
            if faults.capacity_error_types.contains(&provider_type) {
                return capacity_error(ErrorKind::CapacityType, provider_type);
            }
            if faults.capacity_error_groups.contains(&quota_group) {
                return capacity_error(ErrorKind::CapacityGroup, quota_group);
            }
            if let Some(max) = faults.max_instances {
                if st.vms.len() >= max {
                    return err(ErrorKind::Quota, format!("instance quota of {max} reached"));
                }
            }
            if rand::random_bool(faults.create_error_rate.clamp(0.0, 1.0)) {
                return err(ErrorKind::Other, "injected create failure");
            }
            let serial = st.next_serial;
            st.next_serial += 1;
            serial
        };
        let id = format!("lb-{serial:06}");
        let key = match PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519) {
            Ok(k) => k,
            Err(e) => return err(ErrorKind::Other, format!("host key: {e}")),
        };
        let listener = match TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(l) => l,
            Err(e) => return err(ErrorKind::Other, format!("no port for the VM: {e}")),
        };
        let port = match listener.local_addr() {
            Ok(a) => a.port(),
            Err(e) => return err(ErrorKind::Other, format!("no port for the VM: {e}")),
        };
        let now = now_ms();
        let boot_at = now + i64::try_from(faults.boot_delay_ms).unwrap_or(i64::MAX / 2);
        let after = |delay: Option<u64>, rate: Option<f64>| -> Option<i64> {
            let delay = delay?;
            rand::random_bool(rate.unwrap_or(1.0).clamp(0.0, 1.0))
                .then(|| boot_at + i64::try_from(delay).unwrap_or(i64::MAX / 4))
        };
        let record = VmRecord {
            id: id.clone(),
            provider_type,
            image_id,
            quota_group,
            tags,
            port,
            public_key,
            init_command,
            init_done: false,
            boot_at_unix_ms: boot_at,
            crash_at_unix_ms: after(faults.crash_after_ms, faults.crash_rate),
            broken_at_unix_ms: after(faults.broken_after_ms, faults.broken_rate),
            crashed: false,
        };
        let dir = self.vm_dir(&id);
        let written = std::fs::create_dir_all(dir.join("root/var/lock"))
            .and_then(|_| std::fs::create_dir_all(dir.join("root/var/log")))
            .and_then(|_| std::fs::create_dir_all(dir.join("root/var/run")))
            .and_then(|_| {
                key.write_openssh_file(dir.join("host_key"), Default::default())
                    .map_err(std::io::Error::other)
            })
            .and_then(|_| self.save(&record));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return err(ErrorKind::Other, format!("cannot record VM {id}: {e}"));
        }
        let _ = std::fs::remove_file(dir.join("root").join(BROKEN_FLAG));
        log::info!(
            "vm={id} created, type={}, port={port}",
            record.provider_type
        );
        self.start_vm(record, key, Some(listener));
        let st = self.lock();
        match st.vms.get(&id) {
            Some(vm) => Response::Vm(self.info(vm)),
            None => err(
                ErrorKind::Other,
                format!("VM {id} vanished while being created"),
            ),
        }
    }

    fn destroy(&self, id: &str, faults: &Faults) -> Response {
        if rand::random_bool(faults.destroy_error_rate.clamp(0.0, 1.0)) {
            return err(ErrorKind::Other, "injected destroy failure");
        }
        let Some(vm) = self.lock().vms.remove(id) else {
            return err(ErrorKind::NotFound, format!("no VM {id}"));
        };
        vm.task.abort();
        let dir = self.vm_dir(id);
        kill_vm_processes(&dir.join("root"), false);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::warn!("vm={id} destroyed, but its directory stays: {e}");
        }
        log::info!("vm={id} destroyed");
        Response::Ok
    }

    /// Stops every VM's service (for daemon exit); records stay on disk.
    pub fn stop_all(&self) {
        for vm in self.lock().vms.values() {
            vm.task.abort();
        }
    }
}

/// One VM's life: refuse connections while booting, run the init command once, then serve SSH
/// until destroyed or crashed.
async fn run_vm(cloud: Arc<Cloud>, record: VmRecord, key: PrivateKey, listener: TcpListener) {
    let id = record.id.clone();
    let root = cloud.vm_dir(&id).join("root");
    let boot = tokio::time::sleep_until(instant_at(record.boot_at_unix_ms));
    tokio::pin!(boot);
    loop {
        tokio::select! {
            _ = &mut boot => break,
            accepted = listener.accept() => drop(accepted),
        }
    }
    if record.crashed {
        return;
    }
    if !record.init_done {
        run_init(&root, &record.init_command, &id).await;
        cloud.update(&id, |r| r.init_done = true);
    }
    let authorized = record
        .public_key
        .as_deref()
        .and_then(|k| PublicKey::from_openssh(k).ok());
    let config = Arc::new(russh::server::Config {
        keys: vec![key],
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(3600)),
        ..Default::default()
    });
    if let Some(at) = record.broken_at_unix_ms {
        let flag = root.join(BROKEN_FLAG);
        let vm = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(instant_at(at)).await;
            let written = flag
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&flag, b"broken by loopback fault injection\n"));
            if written.is_ok() {
                log::info!("vm={vm} turned broken");
            }
        });
    }
    let crash = async {
        match record.crash_at_unix_ms {
            Some(at) => tokio::time::sleep_until(instant_at(at)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(crash);
    // Connections live in this set: aborting the VM (destroy, crash) drops them all.
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut crash => {
                log::info!("vm={id} crashed");
                cloud.update(&id, |r| r.crashed = true);
                kill_vm_processes(&root, false);
                return;
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Like a real sshd: small exchanges must not wait for delayed ACKs.
                let _ = stream.set_nodelay(true);
                let shell = VmShell::new(id.clone(), root.clone(), authorized.clone());
                sessions.spawn(serve_session(Arc::clone(&config), stream, shell));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// Ends an SSH session when the VM task that owns it is aborted (destroy, crash): russh runs
/// each session in a task of its own, which would otherwise outlive the VM.
struct DisconnectOnDrop(Option<russh::server::Handle>);

impl Drop for DisconnectOnDrop {
    fn drop(&mut self) {
        let (Some(handle), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    "VM stopped".into(),
                    "en".into(),
                )
                .await;
        });
    }
}

async fn serve_session(config: Arc<russh::server::Config>, stream: TcpStream, shell: VmShell) {
    let vm = shell.vm_id.clone();
    match russh::server::run_stream(config, stream, shell).await {
        Ok(session) => {
            let _guard = DisconnectOnDrop(Some(session.handle()));
            if let Err(e) = session.await {
                log::debug!("vm={vm} session ended: {e:?}");
            }
        }
        Err(e) => log::debug!("vm={vm} handshake failed: {e:?}"),
    }
}

async fn run_init(root: &Path, init_command: &str, id: &str) {
    if init_command.trim().is_empty() {
        return;
    }
    let log_path = root.join("var/log");
    let _ = std::fs::create_dir_all(&log_path);
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(init_command)
        .current_dir(root)
        .env(VM_ROOT_ENV, root)
        .env("HOME", root)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match output {
        Ok(out) => {
            let mut text = out.stdout;
            text.extend_from_slice(&out.stderr);
            let _ = std::fs::write(log_path.join("init.log"), text);
            if !out.status.success() {
                log::warn!("vm={id} init command failed: {}", out.status);
            }
        }
        Err(e) => log::warn!("vm={id} init command did not start: {e}"),
    }
}
