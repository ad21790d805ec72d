//! `loopback-cloud`: a small local cloud for dispatch-cloud. Each VM is an SSH server on
//! 127.0.0.1 with its own host key and root directory. Started (detached) by the loopback plugin
//! when its socket does not answer; exits after `--idle-exit-seconds` without a request. VMs are
//! kept under the state directory and come back, same ports and keys, when it starts again.

mod cloud;
mod sshd;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dispatch_cloud_loopback::protocol::{ErrorKind, Request, Response, WireError, SOCKET_NAME};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::cloud::Cloud;

struct Args {
    state_dir: PathBuf,
    idle_exit: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut state_dir = None;
    let mut idle_exit = Duration::from_secs(600);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--state-dir" => state_dir = args.next().map(PathBuf::from),
            "--idle-exit-seconds" => {
                let v = args.next().context("--idle-exit-seconds needs a value")?;
                idle_exit = Duration::from_secs(
                    v.parse()
                        .with_context(|| format!("--idle-exit-seconds {v}"))?,
                );
            }
            "--help" | "-h" => {
                println!("usage: loopback-cloud --state-dir DIR [--idle-exit-seconds N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(Args {
        state_dir: state_dir.context("--state-dir is required")?,
        idle_exit,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = parse_args()?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("state dir {}", args.state_dir.display()))?;
    // One daemon per state directory: a second one (two plugins starting it at once) leaves.
    let lock = std::fs::File::create(args.state_dir.join("daemon.lock"))?;
    if lock.try_lock().is_err() {
        log::info!(
            "Another loopback-cloud serves {}; exiting.",
            args.state_dir.display()
        );
        return Ok(());
    }
    std::fs::write(
        args.state_dir.join("daemon.pid"),
        std::process::id().to_string(),
    )?;
    let socket = args.state_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&socket);
    let cloud = Cloud::new(args.state_dir.clone());
    cloud.reload().await.context("reloading VMs")?;
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("socket {}", socket.display()))?;
    log::info!(
        "loopback-cloud pid {} serving {}",
        std::process::id(),
        socket.display()
    );

    let (activity_tx, mut activity_rx) = watch::channel(());
    let (stop_tx, mut stop_rx) = watch::channel(false);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                activity_tx.send_replace(());
                tokio::spawn(serve(Arc::clone(&cloud), stream, stop_tx.clone()));
            }
            changed = tokio::time::timeout(args.idle_exit, activity_rx.changed()) => {
                if changed.is_err() {
                    log::info!("No request for {:?}; exiting (VMs stay on disk).", args.idle_exit);
                    break;
                }
            }
            _ = stop_rx.changed() => {
                log::info!("Shutdown requested; exiting (VMs stay on disk).");
                break;
            }
        }
    }
    cloud.stop_all();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(args.state_dir.join("daemon.pid"));
    Ok(())
}

async fn serve(cloud: Arc<Cloud>, stream: UnixStream, stop: watch::Sender<bool>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Shutdown) => {
            stop.send_replace(true);
            Response::Ok
        }
        Ok(request) => cloud.handle(request).await,
        Err(e) => Response::Error(WireError::new(
            ErrorKind::BadRequest,
            format!("request: {e}"),
        )),
    };
    let mut out = match serde_json::to_string(&response) {
        Ok(s) => s,
        Err(e) => format!(
            r#"{{"error":{{"kind":"other","message":"{e}","earliest_retry_unix_ms":null,"scope":null}}}}"#
        ),
    };
    out.push('\n');
    let _ = write.write_all(out.as_bytes()).await;
}
