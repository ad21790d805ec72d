//! The SSH executor: one multiplexed russh connection per VM, a new channel per command.
//!
//! A connection is used only after the VM's host key is verified. When the driver can
//! (`verify_host_key`), that happens during the key exchange, before the client authenticates,
//! so a server with the wrong key never sees our credentials. When it cannot, the VM proves
//! itself right after authentication by the instance secret its boot script wrote (equal to
//! its secret tag); reading it is the only command sent before it matched. An unverified key
//! is never accepted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use driver_abi::DriverError;
use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::sync::mpsc;

use crate::instance_secret;
use crate::pool::{BoxFuture, Endpoint, Exec, ExecFactory, Listed};

/// What the executor needs to know about the VM it talks to. Implemented over a driver
/// instance (`DriverTarget`) and by test targets.
pub trait Target: Send + Sync {
    /// `host:port` or `host`; empty while the cloud has not assigned one.
    fn address(&self) -> String;
    fn remote_user(&self) -> String;
    /// The driver's verdict on `host_key` (`ssh-ed25519 AAAA…`). Blocking.
    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError>;
    /// The secret tag set at create, if any.
    fn instance_secret(&self) -> Option<String>;
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("instance has no address yet")]
    NoAddress,
    #[error("connect to {address}: {message}")]
    Connect { address: String, message: String },
    #[error("authentication as {user} at {address} refused")]
    AuthRefused { address: String, user: String },
    #[error("host key of {address} refused: {reason}")]
    HostKeyRefused { address: String, reason: String },
    #[error("ssh session to {address}: {message}")]
    Session { address: String, message: String },
}

/// stdout, stderr and exit status of one command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `None` when the server closed the channel without an exit status (e.g. killed by signal
    /// without the server reporting it).
    pub exit_status: Option<u32>,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

/// Default dial timeout (the original dispatcher's).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the key exchange decided about the server's host key.
#[derive(Clone, Debug)]
enum KeyVerdict {
    /// The driver vouched for it (or it is the key verified before).
    Verified(String),
    /// The driver cannot tell: the instance secret decides, right after authentication and
    /// before the connection is used for anything else.
    NeedsSecret(String),
    Refused(String),
}

/// Checks the host key during the key exchange, before the client authenticates: a server
/// whose key the driver refuses never sees our credentials.
struct KeyCheck {
    target: Arc<dyn Target>,
    /// The key that passed before (shared with the executor).
    verified: Arc<Mutex<Option<String>>>,
    /// std mutex: set once in the callback, read after the handshake.
    verdict: Arc<Mutex<Option<KeyVerdict>>>,
}

impl KeyCheck {
    async fn decide(&self, key: &PublicKeyOrCertificate) -> KeyVerdict {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return KeyVerdict::Refused("the server presented a certificate, not a key".into());
        };
        let Ok(text) = key.to_openssh() else {
            return KeyVerdict::Refused("the server's key cannot be encoded".into());
        };
        if self
            .verified
            .lock()
            .is_ok_and(|k| k.as_deref() == Some(text.as_str()))
        {
            return KeyVerdict::Verified(text);
        }
        // A driver call: blocking, so on a blocking thread.
        let target = Arc::clone(&self.target);
        let key = text.clone();
        match tokio::task::spawn_blocking(move || target.verify_host_key(&key)).await {
            Ok(Ok(())) => KeyVerdict::Verified(text),
            Ok(Err(DriverError::NotImplemented { .. })) => KeyVerdict::NeedsSecret(text),
            Ok(Err(e)) => KeyVerdict::Refused(e.to_string()),
            Err(e) => KeyVerdict::Refused(format!("the driver's check did not finish: {e}")),
        }
    }
}

impl client::Handler for KeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = self.decide(server_public_key).await;
        let accept = !matches!(verdict, KeyVerdict::Refused(_));
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict);
        }
        Ok(accept)
    }
}

/// Executes commands on one VM.
pub struct Executor {
    target: Arc<dyn Target>,
    key: Arc<PrivateKey>,
    dial_timeout: Duration,
    /// The connection and the address it was dialled to: when the target's address changes,
    /// the next command dials the new one. tokio mutex: held across the dial so concurrent
    /// reconnects coalesce into one, and only then; commands share the handle.
    connection: tokio::sync::Mutex<Option<(String, Arc<Handle<KeyCheck>>)>>,
    /// The key that passed verification; a different key later is verified afresh.
    verified_key: Arc<Mutex<Option<String>>>,
}

impl Executor {
    pub fn new(target: Arc<dyn Target>, key: Arc<PrivateKey>) -> Self {
        Executor {
            target,
            key,
            dial_timeout: DIAL_TIMEOUT,
            connection: tokio::sync::Mutex::new(None),
            verified_key: Arc::new(Mutex::new(None)),
        }
    }

    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// Runs `command` with `stdin`, reconnecting once if the existing connection is broken.
    /// Commands run concurrently on the one connection; only dialling is serialized.
    pub async fn execute(&self, command: &str, stdin: &[u8]) -> Result<CommandOutput, SshError> {
        self.execute_into(command, stdin, Stdout::Collect).await
    }

    /// Like `execute`, but stdout goes to `stdout` chunk by chunk as it arrives (the caller's
    /// channel bounds the memory it takes); the output returned holds stderr (at most
    /// `STREAMED_STDERR_LIMIT` bytes) and the exit status.
    pub async fn execute_streaming(
        &self,
        command: &str,
        stdout: mpsc::Sender<Vec<u8>>,
    ) -> Result<CommandOutput, SshError> {
        self.execute_into(command, b"", Stdout::Stream(stdout))
            .await
    }

    async fn execute_into(
        &self,
        command: &str,
        stdin: &[u8],
        stdout: Stdout,
    ) -> Result<CommandOutput, SshError> {
        let session_error = |message: String| SshError::Session {
            address: self.target.address(),
            message,
        };
        let address = self.target.address();
        let usable = |c: &Option<(String, Arc<Handle<KeyCheck>>)>| {
            c.as_ref()
                .filter(|(a, h)| *a == address && !h.is_closed())
                .map(|(_, h)| Arc::clone(h))
        };
        let current = usable(&*self.connection.lock().await);
        if let Some(handle) = current {
            // Only a failure to open the channel is retried: after that, the command may
            // have run, and running it twice is worse than reporting the error.
            match handle.channel_open_session().await {
                Ok(channel) => {
                    return run_on(channel, command, stdin, stdout)
                        .await
                        .map_err(session_error)
                }
                Err(e) => {
                    log::debug!("Existing SSH connection failed ({e}); reconnecting.");
                    let mut guard = self.connection.lock().await;
                    // Another command may have reconnected meanwhile; drop only the dead one.
                    if guard.as_ref().is_some_and(|(_, g)| Arc::ptr_eq(g, &handle)) {
                        *guard = None;
                    }
                }
            }
        }
        let handle = {
            let mut guard = self.connection.lock().await;
            match usable(&guard) {
                Some(h) => h,
                None => {
                    if let Some((old, stale)) = guard.take() {
                        if old != address {
                            log::debug!("Address changed from {old} to {address}; redialling.");
                        }
                        let _ = stale
                            .disconnect(russh::Disconnect::ByApplication, "", "en")
                            .await;
                    }
                    let h = Arc::new(self.connect().await?);
                    *guard = Some((address.clone(), Arc::clone(&h)));
                    h
                }
            }
        };
        run(&handle, command, stdin, stdout)
            .await
            .map_err(session_error)
    }

    /// Drops the connection (e.g. when the VM is gone).
    pub async fn close(&self) {
        if let Some((_, handle)) = self.connection.lock().await.take() {
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }

    async fn connect(&self) -> Result<Handle<KeyCheck>, SshError> {
        let address = self.target.address();
        if address.is_empty() {
            return Err(SshError::NoAddress);
        }
        let dial_address = if address.contains(':') {
            address.clone()
        } else {
            format!("{address}:22")
        };
        let verdict = Arc::new(Mutex::new(None));
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            // Commands are small request/response exchanges: Nagle plus delayed ACKs would add
            // ~40 ms to each.
            nodelay: true,
            // The largest packet the VM may send us. russh's buffers grow to it and stay, per
            // connection: 8 KiB instead of 32 KiB keeps a fleet of thousands small, and logs
            // still stream at many MB/s.
            maximum_packet_size: 8 * 1024,
            ..Default::default()
        });
        let connect_error = |message: String| SshError::Connect {
            address: address.clone(),
            message,
        };
        let refused = |reason: String| SshError::HostKeyRefused {
            address: address.clone(),
            reason,
        };
        let check = KeyCheck {
            target: Arc::clone(&self.target),
            verified: Arc::clone(&self.verified_key),
            verdict: Arc::clone(&verdict),
        };
        let connected = tokio::time::timeout(
            self.dial_timeout,
            client::connect(config, dial_address.as_str(), check),
        )
        .await
        .map_err(|_| connect_error(format!("timed out after {:?}", self.dial_timeout)))?;
        let decided = verdict.lock().ok().and_then(|v| v.clone());
        let mut handle = match (connected, decided) {
            (Ok(handle), Some(KeyVerdict::Verified(_) | KeyVerdict::NeedsSecret(_))) => handle,
            (_, Some(KeyVerdict::Refused(reason))) => return Err(refused(reason)),
            (Ok(_), None) => return Err(refused("the server presented no host key".into())),
            (Err(e), _) => return Err(connect_error(e.to_string())),
        };
        let user = self.target.remote_user();
        let auth = handle
            .authenticate_publickey(
                user.clone(),
                PrivateKeyWithHashAlg::new(Arc::clone(&self.key), None),
            )
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        if !auth.success() {
            return Err(SshError::AuthRefused { address, user });
        }
        let host_key = match verdict.lock().ok().and_then(|v| v.clone()) {
            Some(KeyVerdict::NeedsSecret(key)) => {
                // The first and only command before the secret matched: reading it.
                self.check_secret(&handle, &user).await.map_err(refused)?;
                key
            }
            Some(KeyVerdict::Verified(key)) => key,
            _ => return Err(refused("the host key verdict was lost".into())),
        };
        if let Ok(mut slot) = self.verified_key.lock() {
            *slot = Some(host_key);
        }
        Ok(handle)
    }

    /// For drivers that cannot verify host keys: the VM proves itself by the secret its boot
    /// script wrote, which must equal the instance's secret tag.
    async fn check_secret(&self, handle: &Handle<KeyCheck>, user: &str) -> Result<(), String> {
        let Some(secret) = self.target.instance_secret() else {
            return Err(
                "the driver cannot verify host keys and the instance has no secret tag".into(),
            );
        };
        let out = run(
            handle,
            &instance_secret::read_command(user),
            b"",
            Stdout::Collect,
        )
        .await
        .map_err(|e| format!("reading the instance secret: {e}"))?;
        if !out.success() || out.stdout != secret.as_bytes() {
            return Err("the instance secret on the VM does not match its tag".into());
        }
        Ok(())
    }
}

/// Where a command's stdout goes.
enum Stdout {
    Collect,
    Stream(mpsc::Sender<Vec<u8>>),
}

/// stderr kept from a streamed command: it is for error messages, not data.
pub const STREAMED_STDERR_LIMIT: usize = 64 * 1024;

async fn run(
    handle: &Handle<KeyCheck>,
    command: &str,
    stdin: &[u8],
    stdout: Stdout,
) -> Result<CommandOutput, String> {
    let channel = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    run_on(channel, command, stdin, stdout).await
}

async fn run_on(
    mut channel: russh::Channel<client::Msg>,
    command: &str,
    stdin: &[u8],
    stdout: Stdout,
) -> Result<CommandOutput, String> {
    channel
        .exec(true, command)
        .await
        .map_err(|e| format!("exec: {e}"))?;
    if !stdin.is_empty() {
        channel
            .data(stdin)
            .await
            .map_err(|e| format!("stdin: {e}"))?;
    }
    channel.eof().await.map_err(|e| format!("stdin eof: {e}"))?;
    let mut out = CommandOutput::default();
    loop {
        let msg = match &stdout {
            Stdout::Collect => channel.wait().await,
            // A reader that stopped (an event stream given up) ends the command at once, not
            // at the next output it would have refused.
            Stdout::Stream(tx) => tokio::select! {
                msg = channel.wait() => msg,
                () = tx.closed() => {
                    let _ = channel.close().await;
                    return Err("the reader of the output went away".into());
                }
            },
        };
        let Some(msg) = msg else { break };
        match msg {
            ChannelMsg::Data { data } => match &stdout {
                Stdout::Collect => out.stdout.extend_from_slice(&data),
                Stdout::Stream(tx) => {
                    if tx.send(data.to_vec()).await.is_err() {
                        // The reader stopped: so does the command.
                        let _ = channel.close().await;
                        return Err("the reader of the output went away".into());
                    }
                }
            },
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                let room = match stdout {
                    Stdout::Collect => data.len(),
                    Stdout::Stream(_) => STREAMED_STDERR_LIMIT.saturating_sub(out.stderr.len()),
                };
                out.stderr.extend_from_slice(&data[..data.len().min(room)]);
            }
            ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
            ChannelMsg::Failure => return Err("the server refused the command".into()),
            _ => {}
        }
    }
    Ok(out)
}

/// A driver instance as an SSH target.
pub struct DriverTarget {
    pub instance: Arc<dyn driver_abi::Instance>,
}

impl Target for DriverTarget {
    fn address(&self) -> String {
        self.instance.address()
    }

    fn remote_user(&self) -> String {
        self.instance.remote_user()
    }

    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError> {
        self.instance.verify_host_key(host_key)
    }

    fn instance_secret(&self) -> Option<String> {
        self.instance.tags().get(instance_secret::TAG).cloned()
    }
}

/// The target of a pool worker: what the latest listing said, and the driver instance for
/// host-key checks. `retarget` moves it; the executor then dials the new address.
pub struct ListedTarget {
    instance: Arc<dyn driver_abi::Instance>,
    /// std mutex: read and replaced whole, never held across an await.
    endpoint: Mutex<Endpoint>,
}

impl ListedTarget {
    fn endpoint(&self) -> Endpoint {
        self.endpoint.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Target for ListedTarget {
    fn address(&self) -> String {
        self.endpoint().address
    }

    fn remote_user(&self) -> String {
        self.endpoint().user
    }

    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError> {
        self.instance.verify_host_key(host_key)
    }

    fn instance_secret(&self) -> Option<String> {
        self.endpoint().secret
    }
}

/// The pool's executor over SSH.
pub struct SshExec {
    target: Arc<ListedTarget>,
    executor: Executor,
}

impl Exec for SshExec {
    fn run<'a>(
        &'a self,
        command: &'a str,
        stdin: &'a [u8],
    ) -> BoxFuture<'a, Result<CommandOutput, SshError>> {
        Box::pin(self.executor.execute(command, stdin))
    }

    fn stream<'a>(
        &'a self,
        command: &'a str,
        stdout: mpsc::Sender<Vec<u8>>,
    ) -> BoxFuture<'a, Result<CommandOutput, SshError>> {
        Box::pin(self.executor.execute_streaming(command, stdout))
    }

    fn retarget(&self, endpoint: &Endpoint) {
        if let Ok(mut e) = self.target.endpoint.lock() {
            *e = endpoint.clone();
        }
        // A new secret or user must be proved again.
        if let Ok(mut k) = self.executor.verified_key.lock() {
            *k = None;
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.executor.close())
    }
}

/// Makes an `SshExec` per worker with the dispatcher's key.
pub struct SshFactory {
    pub key: Arc<PrivateKey>,
    pub dial_timeout: Duration,
}

impl ExecFactory for SshFactory {
    fn executor(&self, listed: &Listed) -> Arc<dyn Exec> {
        let target = Arc::new(ListedTarget {
            instance: Arc::clone(&listed.instance),
            endpoint: Mutex::new(listed.endpoint()),
        });
        let executor = Executor::new(target.clone(), Arc::clone(&self.key))
            .with_dial_timeout(self.dial_timeout);
        Arc::new(SshExec { target, executor })
    }
}

/// Generates an ed25519 key pair for the dispatcher.
pub fn generate_key() -> Result<PrivateKey, russh::keys::ssh_key::Error> {
    PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
}
