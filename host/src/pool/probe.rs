//! Talking to one VM: boot probe, runner deployment (by hash), and the runner protocol.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::collect::{CollectError, CollectWriter};
use super::seams::Exec;
use crate::runner::{CollectHeader, ContainerSpec, RunList, WatchLine, DEPLOY_DIR, PROTOCOL};
use crate::ssh::{CommandOutput, SshError};

/// Why a runner command on a VM did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("{what}: exit {status:?}: {stderr}")]
    Failed {
        what: &'static str,
        status: Option<u32>,
        stderr: String,
    },
    #[error("{what}: bad output: {message}")]
    BadOutput { what: &'static str, message: String },
    #[error("runner has no exit status for {0}")]
    NoExitStatus(String),
    #[error(transparent)]
    Collect(#[from] CollectError),
    #[error("the runner at {path} speaks protocol {speaks:?}; this host needs {PROTOCOL} (install the dispatch-cloud-runner built with this host)")]
    Protocol { path: String, speaks: Option<u32> },
}

/// How long an event stream may stay silent (three of the runner's heartbeats).
const WATCH_SILENCE: std::time::Duration = std::time::Duration::from_secs(45);

/// The longest line `runner watch` may send (a snapshot lists every run on the VM).
const WATCH_LINE_LIMIT: usize = 16 * 1024 * 1024;

/// A VM is untrusted: a run whose name is not a plain ID is nothing of ours.
fn plain_runs_only(list: &mut RunList, what: &str) {
    list.containers.retain(|e| {
        let plain = is_plain_id(&e.id);
        if !plain {
            log::warn!("{what} reported a run named {:?}; ignored", e.id);
        }
        plain
    });
}

/// What `runner list` printed, from a VM (untrusted): runs with names that are not plain IDs
/// are dropped.
pub fn parse_run_list(stdout: &[u8]) -> Result<RunList, RemoteError> {
    let mut list: RunList = serde_json::from_slice(stdout).map_err(|e| RemoteError::BadOutput {
        what: "runner list",
        message: e.to_string(),
    })?;
    plain_runs_only(&mut list, "runner list");
    Ok(list)
}

impl RemoteError {
    /// The VM refused us or we refused it (host key, our key): a fault to show an operator,
    /// not a VM still booting.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            RemoteError::Ssh(SshError::HostKeyRefused { .. } | SshError::AuthRefused { .. })
                | RemoteError::Protocol { .. }
        )
    }
}

/// The runner-only executable's name, installed beside `dispatch-cloud`.
pub const RUNNER_EXECUTABLE: &str = "dispatch-cloud-runner";

/// The executable that runs `runner` on VMs: the host's own, deployed and identified by
/// content hash, or one already installed on the image (`runner_path` in the config).
#[derive(Clone)]
pub struct RunnerBinary {
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
    installed: Option<String>,
    /// The file the bytes were read from.
    source: Option<std::path::PathBuf>,
}

impl RunnerBinary {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        RunnerBinary {
            bytes: Arc::new(bytes),
            sha256,
            installed: None,
            source: None,
        }
    }

    fn read_from(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(RunnerBinary {
            source: Some(path.to_path_buf()),
            ..Self::from_bytes(std::fs::read(path)?)
        })
    }

    /// Whether the runner can still be read where it was loaded from (an upgrade that removed
    /// it would make the next start fail): what the health check reports.
    pub fn check_readable(&self) -> Result<(), String> {
        let Some(path) = &self.source else {
            return Ok(());
        };
        std::fs::File::open(path)
            .and_then(|f| f.metadata())
            .map_err(|e| format!("the runner binary {} cannot be read: {e}", path.display()))
            .and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(format!(
                        "the runner binary {} is not a file",
                        path.display()
                    ))
                }
            })
    }

    /// A runner already present on every VM at `path`: nothing is deployed.
    pub fn installed(path: &str) -> Self {
        RunnerBinary {
            bytes: Arc::new(Vec::new()),
            sha256: String::new(),
            installed: Some(path.to_string()),
            source: None,
        }
    }

    /// The `dispatch-cloud-runner` beside this executable (built with it), or, when there is
    /// none or it speaks another protocol (a stale build), this executable itself (it has the
    /// `runner` subcommand too, at ten times the size).
    pub fn current() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let small = exe.with_file_name(RUNNER_EXECUTABLE);
        let speaks = std::process::Command::new(&small)
            .args(["runner", "version"])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        if speaks == Some(PROTOCOL) {
            return Self::read_from(&small);
        }
        log::info!(
            "{} beside {} is missing or speaks runner protocol {speaks:?}, not {PROTOCOL}: deploying the host executable as the runner.",
            RUNNER_EXECUTABLE,
            exe.display()
        );
        Self::read_from(&exe)
    }

    /// Where it lives on a VM; `${DISPATCH_CLOUD_VM_ROOT}` is empty on a real VM.
    pub fn remote_path(&self) -> String {
        if let Some(path) = &self.installed {
            return path.clone();
        }
        format!(
            "${{DISPATCH_CLOUD_VM_ROOT}}/{DEPLOY_DIR}/dispatch-cloud-{}",
            &self.sha256[..16]
        )
    }
}

/// Commands for one VM's runner.
pub struct Remote<'a> {
    pub binary: &'a RunnerBinary,
    /// Prefix `sudo ` (remote user is not root).
    pub sudo: bool,
}

fn failed(what: &'static str, out: &CommandOutput) -> RemoteError {
    RemoteError::Failed {
        what,
        status: out.exit_status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

impl Remote<'_> {
    /// The one place a runner command line is built: every argument single-quoted, so
    /// nothing a VM reported (a run ID from `list`) is ever interpreted by its shell.
    fn runner(&self, args: &[&str]) -> String {
        let mut line = String::new();
        if self.sudo {
            line.push_str("sudo ");
        }
        // The path keeps `${DISPATCH_CLOUD_VM_ROOT}` expandable; it is ours, not the VM's.
        line.push_str(&format!("\"{}\" runner", self.binary.remote_path()));
        for arg in args {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        line
    }

    /// Copies the binary unless the VM already has this exact content. A runner installed on
    /// the image is checked instead: it must speak this host's protocol.
    pub async fn deploy(&self, exec: &dyn Exec) -> Result<(), RemoteError> {
        if self.binary.installed.is_some() {
            let out = exec.run(&self.runner(&["version"]), b"").await?;
            let speaks = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .ok();
            if !out.success() || speaks != Some(PROTOCOL) {
                return Err(RemoteError::Protocol {
                    path: self.binary.remote_path(),
                    speaks,
                });
            }
            return Ok(());
        }
        let path = self.binary.remote_path();
        let check = exec
            .run(&format!("sha256sum \"{path}\" 2>/dev/null"), b"")
            .await?;
        let stdout = String::from_utf8_lossy(&check.stdout);
        if check.success() && stdout.split_whitespace().next() == Some(self.binary.sha256.as_str())
        {
            return Ok(());
        }
        // Mode before content, rename last: a file with the right name is always complete.
        let script = format!(
            "set -e; dst=\"{path}\"; mkdir -p \"$(dirname \"$dst\")\"; tmp=\"$dst.tmp.$$\"; \
             touch \"$tmp\"; chmod 0755 \"$tmp\"; cat >\"$tmp\"; mv \"$tmp\" \"$dst\""
        );
        let script = if self.sudo {
            format!("sudo sh -c '{script}'")
        } else {
            script
        };
        let out = exec.run(&script, &self.binary.bytes).await?;
        if !out.success() {
            return Err(failed("deploying the runner", &out));
        }
        Ok(())
    }

    pub async fn list(&self, exec: &dyn Exec) -> Result<RunList, RemoteError> {
        let out = exec.run(&self.runner(&["list"]), b"").await?;
        if !out.success() {
            return Err(failed("runner list", &out));
        }
        parse_run_list(&out.stdout)
    }

    /// Runs `runner watch` until it ends, passing on each line it sends. Ends with an error
    /// when the VM sends something that is not a watch line.
    pub async fn watch(
        &self,
        exec: &dyn Exec,
        lines: mpsc::Sender<WatchLine>,
    ) -> Result<(), RemoteError> {
        let (chunks_tx, mut chunks) = mpsc::channel::<Vec<u8>>(8);
        let command = self.runner(&["watch"]);
        let run = exec.stream(&command, chunks_tx);
        let parse = async move {
            let mut pending: Vec<u8> = Vec::new();
            loop {
                // The runner writes at least a heartbeat every 15 s: silence this long means a
                // connection that died without closing, and the stream is given up.
                let chunk = match tokio::time::timeout(WATCH_SILENCE, chunks.recv()).await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(_) => {
                        return Err(RemoteError::BadOutput {
                            what: "runner watch",
                            message: format!("silent for {} s", WATCH_SILENCE.as_secs()),
                        })
                    }
                };
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let parsed = match serde_json::from_slice::<WatchLine>(&line) {
                        Ok(WatchLine::Snapshot(mut list)) => {
                            plain_runs_only(&mut list, "runner watch");
                            WatchLine::Snapshot(list)
                        }
                        Ok(WatchLine::Run(e)) if !is_plain_id(&e.id) => {
                            log::warn!("runner watch reported a run named {:?}; ignored", e.id);
                            continue;
                        }
                        Ok(line) => line,
                        Err(e) => {
                            return Err(RemoteError::BadOutput {
                                what: "runner watch",
                                message: e.to_string(),
                            })
                        }
                    };
                    if lines.send(parsed).await.is_err() {
                        return Ok(());
                    }
                }
                if pending.len() > WATCH_LINE_LIMIT {
                    return Err(RemoteError::BadOutput {
                        what: "runner watch",
                        message: format!("a line longer than {WATCH_LINE_LIMIT} bytes"),
                    });
                }
            }
            Ok(())
        };
        // The parser ending (bad line) drops the receiver, which ends the command.
        let (ran, parsed) = tokio::join!(run, parse);
        parsed?;
        let out = ran?;
        if out.exit_status.is_some_and(|s| s != 0) {
            return Err(failed("runner watch", &out));
        }
        Ok(())
    }

    /// Fetches a finished run's result, writing its logs (at most `cap` bytes each) into
    /// `dir` as they arrive.
    pub async fn collect(
        &self,
        exec: &dyn Exec,
        id: &str,
        cap: u64,
        dir: &std::path::Path,
    ) -> Result<CollectHeader, RemoteError> {
        let (chunks_tx, mut chunks) = mpsc::channel::<Vec<u8>>(8);
        let command = self.runner(&["collect", id, &cap.to_string()]);
        let run = exec.stream(&command, chunks_tx);
        let mut writer = CollectWriter::new(dir, cap);
        let write = async {
            while let Some(chunk) = chunks.recv().await {
                writer.feed(&chunk)?;
            }
            Ok::<(), CollectError>(())
        };
        let (ran, written) = tokio::join!(run, write);
        let out = ran?;
        if out.exit_status == Some(3) {
            return Err(RemoteError::NoExitStatus(id.to_string()));
        }
        if !out.success() {
            return Err(failed("runner collect", &out));
        }
        written?;
        Ok(writer.finish()?)
    }

    /// Starts `spec`, after forgetting the finished runs `forget` (one command for both).
    pub async fn start(
        &self,
        exec: &dyn Exec,
        spec: &ContainerSpec,
        forget: &[String],
    ) -> Result<(), RemoteError> {
        let stdin = serde_json::to_vec(spec).map_err(|e| RemoteError::BadOutput {
            what: "encoding the spec",
            message: e.to_string(),
        })?;
        let mut args = vec!["start"];
        args.extend(forget.iter().map(String::as_str));
        let out = exec.run(&self.runner(&args), &stdin).await?;
        if !out.success() {
            return Err(failed("runner start", &out));
        }
        Ok(())
    }

    /// True once the container is gone.
    pub async fn kill(&self, exec: &dyn Exec, id: &str, signal: i32) -> Result<bool, RemoteError> {
        let out = exec
            .run(&self.runner(&["kill", &signal.to_string(), id]), b"")
            .await?;
        Ok(out.success())
    }

    /// Removes finished runs' directories; an error when any was refused (still running).
    pub async fn forget(&self, exec: &dyn Exec, ids: &[String]) -> Result<(), RemoteError> {
        let mut args = vec!["forget"];
        args.extend(ids.iter().map(String::as_str));
        let out = exec.run(&self.runner(&args), b"").await?;
        if !out.success() {
            return Err(failed("runner forget", &out));
        }
        Ok(())
    }
}

/// `'…'` with embedded quotes closed and escaped: a literal word for any POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Container IDs are letters, digits, `-` and `_` (as the runner requires).
pub fn is_plain_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Runs the boot probe; Ok(true) when it exits 0.
pub async fn boot_probe(exec: &dyn Exec, command: &str) -> Result<bool, RemoteError> {
    let command = if command.trim().is_empty() {
        "true"
    } else {
        command
    };
    Ok(exec.run(command, b"").await?.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_arguments_are_literal_words() {
        let binary = RunnerBinary::installed("/usr/bin/dispatch-cloud");
        let remote = Remote {
            binary: &binary,
            sudo: true,
        };
        let hostile = "../x;touch${IFS}STRAY_$(id${IFS}-u)'";
        assert_eq!(
            remote.runner(&["forget", hostile]),
            r#"sudo "/usr/bin/dispatch-cloud" runner 'forget' '../x;touch${IFS}STRAY_$(id${IFS}-u)'\'''"#
        );
        assert!(!is_plain_id(hostile));
        assert!(is_plain_id("zzzzz-dz642-0123456789abcde"));
    }
}
