//! The plugin's side of the daemon socket: blocking, one connection per request (the host calls
//! drivers on blocking threads, and a Unix socket connect costs microseconds).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use driver_abi::DriverError;

use crate::protocol::{Request, Response, SOCKET_NAME};

/// How long a request may take; a create with an init command is the slowest.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a freshly started daemon may take to open its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct CloudClient {
    state_dir: PathBuf,
    daemon_path: PathBuf,
    idle_exit_seconds: u64,
}

impl CloudClient {
    pub fn new(state_dir: PathBuf, daemon_path: PathBuf, idle_exit_seconds: u64) -> Self {
        CloudClient {
            state_dir,
            daemon_path,
            idle_exit_seconds,
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn socket_path(&self) -> PathBuf {
        self.state_dir.join(SOCKET_NAME)
    }

    fn try_call(&self, request: &Request) -> std::io::Result<Response> {
        let mut stream = UnixStream::connect(self.socket_path())?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let mut line = serde_json::to_string(request)?;
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        if reply.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "loopback cloud closed the connection without answering",
            ));
        }
        Ok(serde_json::from_str(&reply)?)
    }

    /// Sends `request`; when the daemon is not running (it exits when idle), starts it and
    /// tries once more.
    pub fn call(&self, request: &Request) -> Result<Response, DriverError> {
        match self.try_call(request) {
            Ok(r) => Ok(r),
            Err(first) if is_not_running(&first) => {
                log::info!(
                    "Loopback cloud in {} is not running ({first}); starting it.",
                    self.state_dir.display()
                );
                self.start_daemon()?;
                self.try_call(request).map_err(|e| {
                    DriverError::other(format!(
                        "loopback cloud in {}: {e}",
                        self.state_dir.display()
                    ))
                })
            }
            Err(e) => Err(DriverError::other(format!(
                "loopback cloud in {}: {e}",
                self.state_dir.display()
            ))),
        }
    }

    pub fn ensure_running(&self) -> Result<(), DriverError> {
        self.call(&Request::Ping).map(|_| ())
    }

    fn start_daemon(&self) -> Result<(), DriverError> {
        std::fs::create_dir_all(&self.state_dir).map_err(|e| {
            DriverError::invalid_config(format!("state_dir {}: {e}", self.state_dir.display()))
        })?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("daemon.log"))
            .map_err(|e| DriverError::other(format!("loopback daemon log: {e}")))?;
        // Only a binary nobody else can change is started, as the host treats plugins.
        let daemon = driver_abi::trust::check_trusted_file(&self.daemon_path).map_err(|why| {
            DriverError::invalid_config(format!(
                "daemon_path {} {why}; refusing to start it",
                self.daemon_path.display()
            ))
        })?;
        // Detached: its own process group, no terminal and none of our stdio, so it neither
        // dies with the host nor holds a test harness's pipes open.
        Command::new(&daemon)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--idle-exit-seconds")
            .arg(self.idle_exit_seconds.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                DriverError::invalid_config(format!(
                    "daemon_path {}: cannot start it: {e}",
                    self.daemon_path.display()
                ))
            })?;
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            match self.try_call(&Request::Ping) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(DriverError::other(format!(
                        "loopback cloud did not start within {DAEMON_START_TIMEOUT:?} \
                         (see {}): {e}",
                        self.state_dir.join("daemon.log").display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn is_not_running(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
    )
}

/// The `loopback-cloud` binary in the directory this plugin was loaded from.
pub fn daemon_beside_plugin() -> Option<PathBuf> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let marker = daemon_beside_plugin as *const libc::c_void;
    // SAFETY: dladdr only reads the loader's tables for an address inside this library and fills
    // `info`; dli_fname points into the loader's own string table.
    let found = unsafe { libc::dladdr(marker, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: checked non-null above; the loader keeps the string alive while we are loaded.
    let file = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    let mut file = PathBuf::from(file.to_str().ok()?);
    // A host that loads plugins through the descriptor it hashed (`/proc/self/fd/N`, kept
    // open) names that; the link leads to the real file.
    if file.starts_with("/proc/self/fd") {
        file = std::fs::read_link(&file).ok()?;
    }
    let candidate = file.parent()?.join("loopback-cloud");
    candidate.is_file().then_some(candidate)
}
