//! `dispatch-cloud serve`: wires config, queue, plugin, wrappers, dispatcher and API together.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use russh::keys::PrivateKey;

use crate::api::{self, ApiState};
use crate::cloudops::{CloudOps, Policy};
use crate::config::ClusterConfig;
use crate::dispatcher::Dispatcher;
use crate::metrics::Metrics;
use crate::plugin::{self, Catalogue};
use crate::pool::probe::RunnerBinary;
use crate::queue::SqliteQueue;
use crate::ssh::SshFactory;

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Where a running `serve` writes the address it listens on.
pub fn address_path(config: &ClusterConfig) -> std::path::PathBuf {
    config.state_dir.join("api-address")
}

/// The dispatcher's SSH key, generated (0600) on first start.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    if path.exists() {
        return PrivateKey::read_openssh_file(path)
            .with_context(|| format!("SSH key {}", path.display()));
    }
    let key = crate::ssh::generate_key().context("generating the SSH key")?;
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .context("encoding the SSH key")?;
    write_private(path, text.as_bytes())
        .with_context(|| format!("writing SSH key {}", path.display()))?;
    log::info!("Generated SSH key {}.", path.display());
    Ok(key)
}

/// The API tokens: the config's, or one generated into `<state_dir>/api-token` (0600).
pub fn load_or_create_tokens(config: &ClusterConfig) -> anyhow::Result<Vec<String>> {
    if !config.tokens.is_empty() {
        return Ok(config.tokens.clone());
    }
    let path = config.token_path();
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim();
        if token.is_empty() {
            bail!(
                "{} is empty: delete it and a new token is generated",
                path.display()
            );
        }
        return Ok(vec![token.to_string()]);
    }
    let token = hex::encode(rand::random::<[u8; 24]>());
    write_private(&path, token.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(vec![token])
}

/// Makes `state_dir` private: the directory and every directory below it 0700, every file
/// 0600 (the queue holds each container's environment, the logs their output). Creates the
/// queue file 0600 before SQLite opens it, since SQLite gives its `-wal` and `-shm` files the
/// database file's mode.
pub fn make_private(state_dir: &Path, queue_file: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("state dir {}", state_dir.display()))?;
    if !queue_file.exists() {
        if let Some(parent) = queue_file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("queue directory {}", parent.display()))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(queue_file)
            .with_context(|| format!("creating {}", queue_file.display()))?;
    }
    // The queue may live outside the state dir (`queue_path`).
    for suffix in ["", "-wal", "-shm"] {
        let mut name = queue_file.as_os_str().to_owned();
        name.push(suffix);
        restrict(Path::new(&name), 0o600)?;
    }
    // A state dir that is a symlink: its target is what must be private.
    let real = std::fs::canonicalize(state_dir)
        .with_context(|| format!("state dir {}", state_dir.display()))?;
    // This version writes everything private (logs 0600 in 0700 directories): only a state
    // dir an older version left open needs the walk over every file, at every start not.
    let open = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&real)
            .map(|m| m.permissions().mode() & 0o077 != 0)
            .unwrap_or(true)
    };
    if !open {
        return Ok(());
    }
    let mut stack = vec![real];
    while let Some(dir) = stack.pop() {
        restrict(&dir, 0o700)?;
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                restrict(&entry.path(), 0o600)?;
            }
        }
    }
    Ok(())
}

/// Clears group and other bits of `path` when any is set (a missing file is fine). The file
/// is opened without following a symlink and changed through that descriptor, so a link
/// swapped in meanwhile cannot turn the change onto a file elsewhere.
fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        // Missing, or a symlink (ELOOP): nothing of ours to change.
        Err(_) => return Ok(()),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if meta.permissions().mode() & 0o077 == 0 {
        return Ok(());
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("making {} private", path.display()))
}

/// Serves `app` on `listener` until `stop` resolves: a client gets `header_read` to send a
/// request's headers, and requests still running `deadline` after `stop` are cut off, so
/// neither a slow client nor a stuck download keeps a stopping server alive.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_read: std::time::Duration,
    deadline: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    /// More open connections than an operator's tools need; beyond it new ones are closed
    /// at once, so nobody can use up the descriptors SSH and SQLite need.
    const MOST_CONNECTIONS: usize = 512;
    let slots = Arc::new(tokio::sync::Semaphore::new(MOST_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pace the retries.
                        log::warn!("accepting an API connection: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    log::warn!("{MOST_CONNECTIONS} API connections open; closing one from {peer}");
                    continue;
                };
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read)
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
                let connection = graceful.watch(connection);
                connections.spawn(async move {
                    if let Err(e) = connection.await {
                        log::debug!("API connection from {peer}: {e}");
                    }
                    drop(slot);
                });
                // Reap the finished ones as we go.
                while connections.try_join_next().is_some() {}
            }
            () = &mut stop => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        log::warn!("API requests still open {deadline:?} after the stop; cutting them off");
    }
}

/// Runs the dispatcher and its API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: ClusterConfig,
    plugins_file: &Path,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    make_private(&config.state_dir, &config.queue_path())?;
    let key = Arc::new(load_or_create_key(&config.ssh_key_path())?);
    let tokens = load_or_create_tokens(&config)?;
    let queue = Arc::new(SqliteQueue::open(&config.queue_path(), &config.cluster_id)?);

    let catalogue = Catalogue::load(plugins_file)?;
    if let Some(warning) = catalogue.readable_secrets() {
        log::warn!("{warning}");
    }
    let entry = catalogue
        .instance_set(&config.instance_set)
        .ok_or_else(|| {
            anyhow!(
                "{}: no instance set named {:?} (cluster config instance_set)",
                plugins_file.display(),
                config.instance_set
            )
        })?
        .clone();
    let plugin_entry = catalogue
        .plugin(&entry.driver)
        .ok_or_else(|| {
            anyhow!(
                "{}: no plugin named {:?}",
                plugins_file.display(),
                entry.driver
            )
        })?
        .clone();
    let limits = &config.limits;
    let policy = Policy {
        max_instances: limits.max_instances,
        ops_interval: (limits.max_cloud_ops_per_second > 0.0)
            .then(|| std::time::Duration::from_secs_f64(1.0 / limits.max_cloud_ops_per_second)),
        max_concurrent_creates: limits.max_concurrent_instance_create_ops,
        quota_holdoff: config.timeouts.quota_holdoff,
        capacity_holdoff: config.timeouts.capacity_holdoff,
        create_cap_holdoff: std::time::Duration::from_secs(5).min(config.timeouts.probe_interval),
        default_tags: config.resource_tags.clone(),
    };
    let types = config.instance_types();
    // Loading a plugin and asking its quota groups are driver calls: off the event loop.
    let (cloud, metrics) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let loaded = plugin::load(&plugin_entry)?;
        let metrics = Arc::new(Metrics::new(&loaded.driver_name, &types));
        metrics.plugin_loaded(&plugin_entry.name, "ok");
        let set = loaded
            .new_instance_set(&entry, &Default::default())
            .with_context(|| {
                format!(
                    "instance set {} on driver {}",
                    entry.name, loaded.driver_name
                )
            })?;
        let cloud = CloudOps::new(Arc::from(set), policy, &types).observed(Arc::clone(&metrics));
        Ok((cloud, metrics))
    })
    .await??;
    let binary = match &config.runner_path {
        Some(path) => RunnerBinary::installed(path),
        None => RunnerBinary::current().context("reading this executable to deploy it to VMs")?,
    };
    let factory = Arc::new(SshFactory {
        key: Arc::clone(&key),
        dial_timeout: config.timeouts.ssh_dial,
    });
    let public_key = key.public_key().to_openssh().ok();
    let dispatcher = Dispatcher::new(
        &config,
        queue.clone(),
        Arc::new(cloud),
        factory,
        binary.clone(),
        public_key,
        Arc::clone(&metrics) as Arc<dyn crate::pool::FleetObserver>,
    )?;
    let handle = dispatcher.handle();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut dispatcher_stop = stop_rx.clone();
    let dispatcher_task = tokio::spawn(dispatcher.run(async move {
        let _ = dispatcher_stop.changed().await;
    }));
    let state = ApiState {
        queue,
        dispatcher: handle,
        tokens: Arc::new(tokens),
        management_tokens: Arc::new(config.management_tokens.clone()),
        metrics,
        runner: binary,
    };
    // The status page answers on the same listener, with the same tokens.
    let app = crate::page::router(state.clone()).merge(api::router(state));
    let address = listener.local_addr()?;
    // Clients of this state dir find the server here, also when the config says port 0.
    let address_file = address_path(&config);
    let _ = std::fs::remove_file(&address_file);
    write_private(&address_file, address.to_string().as_bytes())
        .with_context(|| format!("writing {}", address_file.display()))?;
    log::info!("Serving the API on {address}.");
    if !address.ip().is_loopback() {
        log::warn!(
            "The API listens on {address}, beyond this machine, in plain HTTP: bearer tokens and container environments cross the network readable. Put a TLS-terminating proxy in front, or listen on 127.0.0.1."
        );
    }
    let mut api_stop = stop_rx;
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    serve_http(
        listener,
        app,
        config.timeouts.api_header_read,
        config.timeouts.api_shutdown,
        async move {
            let _ = api_stop.changed().await;
        },
    )
    .await;
    dispatcher_task.await?;
    let _ = std::fs::remove_file(&address_file);
    Ok(())
}
