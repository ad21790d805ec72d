//! One VM's SSH service: public-key auth against the key given at create, one `exec` per
//! channel, run with `sh -c` inside the VM's root directory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use dispatch_cloud_loopback::protocol::VM_ROOT_ENV;
use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Authentication attempts, one line each, relative to the VM root.
pub const AUTH_LOG: &str = "var/log/loopback-sshd-auth.log";

/// Chunks of stdin queued per command before the SSH session waits for the process to read:
/// bounded so a client streaming a large file cannot grow the daemon without limit.
const STDIN_QUEUE: usize = 16;

pub struct VmShell {
    pub vm_id: String,
    pub root: PathBuf,
    pub authorized_key: Option<PublicKey>,
    stdin: HashMap<ChannelId, mpsc::Sender<Vec<u8>>>,
}

impl VmShell {
    pub fn new(vm_id: String, root: PathBuf, authorized_key: Option<PublicKey>) -> Self {
        VmShell {
            vm_id,
            root,
            authorized_key,
            stdin: HashMap::new(),
        }
    }
}

/// A VM runs what it is given as root would; loopback runs it as the daemon's user.
fn strip_sudo(command: &str) -> &str {
    let trimmed = command.trim_start();
    trimmed.strip_prefix("sudo ").unwrap_or(trimmed)
}

impl russh::server::Handler for VmShell {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Every attempt is recorded, so tests can prove a client never authenticated to a
        // server whose host key it should have refused first.
        let log = self.root.join(AUTH_LOG);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
        {
            let _ = std::io::Write::write_all(&mut f, format!("publickey {user}\n").as_bytes());
        }
        match &self.authorized_key {
            Some(allowed) if allowed.key_data() == key.public_key.key_data() => Ok(Auth::Accept),
            _ => Ok(Auth::reject()),
        }
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = strip_sudo(&String::from_utf8_lossy(data)).to_string();
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        self.stdin.insert(channel, stdin_tx);
        session.channel_success(channel)?;
        log::debug!("vm={} exec {command:?}", self.vm_id);
        tokio::spawn(run_command(
            self.root.clone(),
            command,
            channel,
            session.handle(),
            stdin_rx,
        ));
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.stdin.get(&channel) {
            // The process may have exited without reading; its input is then discarded.
            let _ = tx.send(data.to_vec()).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the sender closes the process's stdin.
        self.stdin.remove(&channel);
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.stdin.remove(&channel);
        Ok(())
    }
}

async fn pump<R: AsyncRead + Unpin>(
    mut from: R,
    handle: Arc<Handle>,
    channel: ChannelId,
    ext: Option<u32>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let chunk = buf[..n].to_vec();
                let sent = match ext {
                    None => handle.data(channel, chunk).await.is_ok(),
                    Some(code) => handle.extended_data(channel, code, chunk).await.is_ok(),
                };
                if !sent {
                    return;
                }
            }
        }
    }
}

async fn run_command(
    root: PathBuf,
    command: String,
    channel: ChannelId,
    handle: Handle,
    mut stdin_rx: mpsc::Receiver<Vec<u8>>,
) {
    let handle = Arc::new(handle);
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .current_dir(&root)
        .env(VM_ROOT_ENV, &root)
        .env("HOME", &root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = handle
                .extended_data(channel, 1, format!("sh: cannot start: {e}\n").into_bytes())
                .await;
            let _ = handle.exit_status_request(channel, 127).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
            return;
        }
    };
    let stdin_task = child.stdin.take().map(|mut stdin| {
        tokio::spawn(async move {
            while let Some(chunk) = stdin_rx.recv().await {
                if stdin.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            // Dropping stdin here gives the process its EOF.
        })
    });
    let stdout = child
        .stdout
        .take()
        .map(|s| tokio::spawn(pump(s, Arc::clone(&handle), channel, None)));
    let stderr = child
        .stderr
        .take()
        .map(|s| tokio::spawn(pump(s, Arc::clone(&handle), channel, Some(1))));
    let status = child.wait().await;
    // Output must be complete before the exit status: clients stop reading at close.
    for task in [stdout, stderr].into_iter().flatten() {
        let _ = task.await;
    }
    if let Some(task) = stdin_task {
        task.abort();
    }
    let code = match status {
        Ok(s) => s
            .code()
            .map(|c| c as u32)
            .or_else(|| {
                std::os::unix::process::ExitStatusExt::signal(&s).map(|sig| 128 + sig as u32)
            })
            .unwrap_or(255),
        Err(_) => 255,
    };
    let _ = handle.exit_status_request(channel, code).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

#[cfg(test)]
mod tests {
    use super::strip_sudo;

    #[test]
    fn sudo_prefix_is_dropped_once() {
        assert_eq!(strip_sudo("sudo cat /x"), "cat /x");
        assert_eq!(strip_sudo("  sudo sudo ls"), "sudo ls");
        assert_eq!(strip_sudo("echo sudo"), "echo sudo");
    }
}
