//! The `dispatch-cloud` command: parses flags and calls into the library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use dispatch_cloud::client::Client;
use dispatch_cloud::config::{ClusterConfig, Size};
use dispatch_cloud::conformance;
use dispatch_cloud::plugin::{self, Catalogue};
use dispatch_cloud::queue::{ContainerState, NewContainer, RuntimeConstraints};

/// Exit code of `submit --wait` when the container was cancelled.
const CANCELLED_EXIT: u8 = 125;

#[derive(Parser)]
#[command(
    name = "dispatch-cloud",
    version,
    about = "Runs batch containers on elastic cloud VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How client commands find the server.
#[derive(Args, Clone)]
struct ServerArgs {
    /// Cluster config; also where the default URL and token come from.
    #[arg(long, global = true, env = "DISPATCH_CLOUD_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, global = true, env = "DISPATCH_CLOUD_URL")]
    url: Option<String>,
    #[arg(
        long,
        global = true,
        env = "DISPATCH_CLOUD_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A file holding the token (keeps it out of the process list and shell history).
    #[arg(
        long,
        global = true,
        env = "DISPATCH_CLOUD_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// The state directory of the `serve` to talk to (its address and generated token are
    /// there), when it is not the config's: as `serve --state-dir`.
    #[arg(long, global = true, env = "DISPATCH_CLOUD_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

/// Which instances an instance command acts on.
#[derive(Args)]
struct InstanceArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Why (logged; for `kill`, recorded as the shutdown reason).
    #[arg(long)]
    reason: Option<String>,
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Applies `action` to every instance; exit code 1 if any was refused.
fn instance_action(args: InstanceArgs, action: &str) -> anyhow::Result<ExitCode> {
    let client = client(&args.server)?;
    let mut refused = false;
    for id in &args.ids {
        match client.instance_action(id, action, args.reason.as_deref()) {
            Ok(()) => println!("{id}: {action}"),
            Err(e) => {
                refused = true;
                eprintln!("{id}: {e:#}");
            }
        }
    }
    Ok(if refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What `submit` sends.
#[derive(Args)]
struct SubmitArgs {
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// e.g. 512MiB, 2GiB
    #[arg(long, default_value = "256MiB")]
    ram: String,
    #[arg(long, default_value = "0")]
    scratch: String,
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    #[arg(long)]
    preemptible: bool,
    #[arg(long, default_value_t = 1)]
    priority: i64,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    workdir: Option<String>,
    /// K=V, repeatable.
    #[arg(long = "env")]
    env: Vec<String>,
    /// Submit N copies in one request (all or none); each sees its index, 0 to N-1, in
    /// DISPATCH_CLOUD_INDEX.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: Option<u32>,
    /// Follow them and exit with the exit code (the first non-zero one; 125 if cancelled).
    #[arg(long)]
    wait: bool,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the dispatcher and its API.
    Serve {
        #[arg(long, env = "DISPATCH_CLOUD_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "DISPATCH_CLOUD_PLUGINS")]
        plugins: Option<PathBuf>,
        #[arg(long, env = "DISPATCH_CLOUD_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        listen: Option<String>,
    },
    /// Keep instances (idle or not) and give them no new work. Needs a management token.
    Hold {
        #[command(flatten)]
        args: InstanceArgs,
    },
    /// Give instances no new work and shut them down once idle.
    Drain {
        #[command(flatten)]
        args: InstanceArgs,
    },
    /// Return instances to normal: take work, shut down after the idle timeout.
    Run {
        #[command(flatten)]
        args: InstanceArgs,
    },
    /// Destroy instances now; their containers go back to the queue.
    Kill {
        #[command(flatten)]
        args: InstanceArgs,
    },
    /// Print the dispatcher's SSH public key (the line to authorize on images that need it).
    SshKey {
        #[arg(long, env = "DISPATCH_CLOUD_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "DISPATCH_CLOUD_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Submit a container: `submit [options] -- CMD ARGS…`. Prints its ID (one per line with
    /// `--count`).
    Submit {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        args: SubmitArgs,
    },
    /// List containers, newest first: the newest page, or all of them with `--all`.
    Ps {
        #[command(flatten)]
        server: ServerArgs,
        /// The API's container objects as a JSON array (see README).
        #[arg(long)]
        json: bool,
        /// Every container, walking the pages.
        #[arg(long)]
        all: bool,
        /// Containers per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The scheduler's queue instead: active containers in the order it serves them,
        /// with their eligible types, how long each has waited and why.
        #[arg(long, conflicts_with_all = ["all", "limit"])]
        scheduling: bool,
    },
    /// Print a finished container's stdout (and its stderr to stderr).
    Logs {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Cancel a container (a running one is sent SIGTERM).
    Cancel {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Change a container's priority (0 stops it from running, and kills it if it runs).
    Priority {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
        priority: i64,
    },
    /// List VMs with state, type, idle behaviour and containers.
    Instances {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        json: bool,
    },
    /// Check a cluster config; reports every problem with file, line and key.
    CheckConfig {
        #[arg(long, env = "DISPATCH_CLOUD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load every plugin in plugins.toml and list what was found.
    Plugins {
        #[arg(long, default_value = "plugins.toml", env = "DISPATCH_CLOUD_PLUGINS")]
        plugins: PathBuf,
        /// One JSON array of {name, driver, driver_version, abi_version, path, sha256}.
        #[arg(long)]
        json: bool,
        /// Also open every instance set with its parameters (credentials and all), so what
        /// the driver refuses is found before `serve`; exit 1 if any is refused.
        #[arg(long)]
        check: bool,
    },
    /// Run the driver conformance checks against one instance set.
    DriverTest {
        #[arg(long, default_value = "plugins.toml", env = "DISPATCH_CLOUD_PLUGINS")]
        plugins: PathBuf,
        /// The `name` of an [[instance_sets]] entry.
        #[arg(long)]
        instance_set: String,
        /// Provider instance type to boot.
        #[arg(long, default_value = "small")]
        instance_type: String,
        #[arg(long, default_value = "default")]
        image: String,
        /// Destroy this set's existing instances first instead of refusing.
        #[arg(long)]
        destroy_existing: bool,
        /// A command to run over SSH once the VM has booted.
        #[arg(long)]
        command: Option<String>,
        #[arg(long, default_value = "true")]
        boot_probe: String,
        #[arg(long, default_value_t = 600)]
        boot_timeout_seconds: u64,
        /// Skip the SSH steps (for API-only emulators).
        #[arg(long)]
        skip_ssh: bool,
        /// Log in to the test VM with this OpenSSH private key instead of a throwaway one
        /// (for images that only accept a known key).
        #[arg(long)]
        ssh_key: Option<PathBuf>,
    },
    /// The worker side, run on VMs by the dispatcher.
    #[command(hide = true)]
    Runner {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // The runner is exec'd on VMs many times a second: skip logger and clap set-up costs.
    if args.get(1).map(String::as_str) == Some("runner") {
        return match dispatch_cloud::runner::main(&args[2..]) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    // `serve` is a daemon whose log is its story: state changes at info. Client commands print
    // their results; their log shows only what went wrong.
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(file: Option<&Path>) -> anyhow::Result<ClusterConfig> {
    ClusterConfig::load(file).map_err(|e| anyhow!("{e}"))
}

fn client(server: &ServerArgs) -> anyhow::Result<Client> {
    let mut config = load_config(server.config.as_deref())?;
    if let Some(dir) = &server.state_dir {
        config.state_dir = dir.clone();
    }
    let url = server.url.clone().unwrap_or_else(|| {
        // A running `serve` writes where it really listens (the config may say port 0).
        let address = std::fs::read_to_string(dispatch_cloud::serve::address_path(&config))
            .map(|a| a.trim().to_string())
            .unwrap_or_else(|_| config.listen.clone());
        format!("http://{address}")
    });
    let from_file = match &server.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .with_context(|| format!("--token-file {}", path.display()))?,
        ),
        None => None,
    };
    let token = match server.token.clone().or(from_file) {
        Some(t) => t,
        None => match config.tokens.first() {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(config.token_path())
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "no token: give --token, set DISPATCH_CLOUD_TOKEN, or run where {} exists",
                        config.token_path().display()
                    )
                })?,
        },
    };
    Ok(Client::new(&url, &token))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            plugins,
            state_dir,
            listen,
        } => {
            let mut cfg = load_config(config.as_deref())?;
            if let Some(dir) = state_dir {
                cfg.state_dir = dir;
            }
            if let Some(addr) = listen {
                cfg.listen = addr;
            }
            let plugins = plugins.unwrap_or_else(|| cfg.plugins.clone());
            serve(cfg, &plugins)
        }
        Command::Submit { server, args } => submit(server, args),
        Command::Ps {
            server,
            json,
            all,
            limit,
            scheduling,
        } => {
            if scheduling {
                ps_scheduling(server, json)
            } else {
                ps(server, json, all, limit)
            }
        }
        Command::Logs { server, id } => {
            let client = client(&server)?;
            use std::io::Write;
            std::io::stdout().write_all(&client.logs(&id, "stdout")?)?;
            std::io::stderr().write_all(&client.logs(&id, "stderr")?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { server, id } => {
            let c = client(&server)?.cancel(&id)?;
            println!("{} {}", c.id, c.state.as_str());
            Ok(ExitCode::SUCCESS)
        }
        Command::Priority {
            server,
            id,
            priority,
        } => {
            let c = client(&server)?.set_priority(&id, priority)?;
            println!("{} priority {}", c.id, c.priority);
            Ok(ExitCode::SUCCESS)
        }
        Command::Instances { server, json } => instances(server, json),
        Command::Hold { args } => instance_action(args, "hold"),
        Command::Drain { args } => instance_action(args, "drain"),
        Command::Run { args } => instance_action(args, "run"),
        Command::Kill { args } => instance_action(args, "kill"),
        Command::SshKey { config, state_dir } => {
            let mut cfg = load_config(config.as_deref())?;
            if let Some(dir) = state_dir {
                cfg.state_dir = dir;
            }
            let path = cfg.ssh_key_path();
            if !path.exists() {
                bail!(
                    "{} does not exist yet: `serve` generates the key at its first start",
                    path.display()
                );
            }
            let key = russh::keys::PrivateKey::read_openssh_file(&path)
                .with_context(|| format!("SSH key {}", path.display()))?;
            let line = key
                .public_key()
                .to_openssh()
                .context("encoding the public key")?;
            println!("{line} dispatch-cloud");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => check_config(config),
        Command::Plugins {
            plugins,
            json,
            check,
        } => list_plugins(&plugins, json, check),
        Command::DriverTest {
            plugins,
            instance_set,
            instance_type,
            image,
            destroy_existing,
            command,
            boot_probe,
            boot_timeout_seconds,
            skip_ssh,
            ssh_key,
        } => {
            let options = conformance::Options {
                instance_type,
                image,
                destroy_existing,
                command,
                boot_probe,
                boot_timeout: Duration::from_secs(boot_timeout_seconds),
                skip_ssh,
                ..Default::default()
            };
            driver_test(&plugins, &instance_set, &options, ssh_key.as_deref())
        }
        Command::Runner { .. } => bail!("runner is handled before argument parsing"),
    }
}

/// The environment variable holding a copy's index under `submit --count`.
const INDEX_ENV: &str = "DISPATCH_CLOUD_INDEX";

/// `submit`: builds the submission from the flags, sends it, and with `--wait` follows it.
fn submit(server: ServerArgs, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let mut env_map = BTreeMap::new();
    for kv in args.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {kv:?}: expected K=V"))?;
        env_map.insert(k.to_string(), v.to_string());
    }
    let new = NewContainer {
        command: args.command,
        env: env_map,
        working_dir: args.workdir,
        image: args.image,
        priority: args.priority,
        runtime_constraints: RuntimeConstraints {
            vcpus: args.vcpus,
            ram_bytes: Size::parse(&args.ram).map_err(|e| anyhow!("--ram: {e}"))?.0,
            scratch_bytes: Size::parse(&args.scratch)
                .map_err(|e| anyhow!("--scratch: {e}"))?
                .0,
            gpus: args.gpus,
            preemptible: args.preemptible,
        },
    };
    let client = client(&server)?;
    let submitted = match args.count {
        None => vec![client.submit(&new)?],
        Some(n) => {
            let copies: Vec<NewContainer> = (0..n)
                .map(|i| {
                    let mut copy = new.clone();
                    copy.env.insert(INDEX_ENV.into(), i.to_string());
                    copy
                })
                .collect();
            client.submit_many(&copies)?
        }
    };
    for c in &submitted {
        println!("{}", c.id);
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut exit = ExitCode::SUCCESS;
    let mut first_failure = false;
    for c in submitted {
        let code = follow(&client, c)?;
        if code != ExitCode::SUCCESS && !first_failure {
            first_failure = true;
            exit = code;
        }
    }
    Ok(exit)
}

/// Waits for a container to end, printing its state changes; its exit code as ours.
fn follow(client: &Client, c: dispatch_cloud::queue::Container) -> anyhow::Result<ExitCode> {
    let mut last = c.state;
    eprintln!("{} {:?}", c.id, last);
    loop {
        let now = client.get(&c.id)?;
        if now.state != last {
            last = now.state;
            eprintln!(
                "{} {:?}{}",
                now.id,
                now.state,
                now.instance_id
                    .as_deref()
                    .map(|i| format!(" on {i}"))
                    .unwrap_or_default()
            );
        }
        match now.state {
            ContainerState::Complete => {
                let code = now.exit_code.unwrap_or(1);
                return Ok(ExitCode::from(
                    u8::try_from(code.clamp(0, 255)).unwrap_or(1),
                ));
            }
            ContainerState::Cancelled => {
                eprintln!("cancelled: {}", now.runtime_error.unwrap_or_default());
                return Ok(ExitCode::from(CANCELLED_EXIT));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ps`: the containers, newest first (one page, or all with `all`).
fn ps(server: ServerArgs, json: bool, all: bool, limit: usize) -> anyhow::Result<ExitCode> {
    let client = client(&server)?;
    let list = if all {
        client.list()?
    } else {
        client.list_page(limit.max(1), None)?.containers
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!(
            "{:<27} {:<9} {:>4} {:>4} {:<8} {:<12} COMMAND",
            "ID", "STATE", "PRIO", "EXIT", "TYPE", "INSTANCE"
        );
        for c in list {
            // A waiting container says why instead of where it ran.
            let waiting = c.scheduling_status.map(|s| format!("  [{s}]"));
            println!(
                "{:<27} {:<9} {:>4} {:>4} {:<8} {:<12} {}{}",
                c.id,
                c.state.as_str(),
                c.priority,
                c.exit_code.map(|e| e.to_string()).unwrap_or_default(),
                c.instance_type.unwrap_or_default(),
                c.instance_id.unwrap_or_default(),
                c.command.join(" "),
                waiting.unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ps --scheduling`: the scheduler's queue, in the order it serves containers.
fn ps_scheduling(server: ServerArgs, json: bool) -> anyhow::Result<ExitCode> {
    let queue = client(&server)?.scheduler_queue()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&queue)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = dispatch_cloud::queue::now_ms();
    println!(
        "{:<27} {:<8} {:>4} {:>7} {:<20} STATUS",
        "ID", "STATE", "PRIO", "WAITED", "TYPES"
    );
    for e in queue {
        let waited = Duration::from_millis(u64::try_from(now - e.first_seen_at_ms).unwrap_or(0));
        println!(
            "{:<27} {:<8} {:>4} {:>7} {:<20} {}",
            e.container,
            e.state.as_str(),
            e.priority,
            format!("{}s", waited.as_secs()),
            if e.instance_types.is_empty() {
                "-".to_string()
            } else {
                e.instance_types.join(",")
            },
            e.scheduling_status
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `instances`: the VMs as the dispatcher sees them, in the original's columns (`-` for
/// what is not known), then when each last worked and why one is not in use.
fn instances(server: ServerArgs, json: bool) -> anyhow::Result<ExitCode> {
    let list = client(&server)?.instances()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let now = dispatch_cloud::queue::now_ms();
    println!(
        "{:<20} {:<16} {:<9} {:<6} {:<8} {:<14} {:>8} {:<28} {:>9} REASON",
        "INSTANCE",
        "ADDRESS",
        "STATE",
        "IDLE",
        "TYPE",
        "PROVIDER-TYPE",
        "PRICE",
        "CONTAINERS",
        "LAST-BUSY"
    );
    for i in list {
        let idle_for = Duration::from_millis(u64::try_from(now - i.last_busy_at_ms).unwrap_or(0));
        println!(
            "{:<20} {:<16} {:<9} {:<6} {:<8} {:<14} {:>8} {:<28} {:>9} {}",
            if i.id.is_empty() { "(creating)" } else { &i.id },
            or_dash(&i.address),
            i.state.as_str(),
            i.idle_behavior.as_str(),
            or_dash(i.instance_type.as_deref().unwrap_or_default()),
            or_dash(&i.provider_type),
            format!("{:.4}", i.price),
            or_dash(&i.containers.join(",")),
            format!("{}s ago", idle_for.as_secs()),
            i.reason.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `check-config`: every problem of the file at once.
fn check_config(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    match ClusterConfig::load(config.as_deref()) {
        Ok(_) => {
            println!(
                "{}: OK",
                config
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(defaults)".into())
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            for p in &e.problems {
                eprintln!("{p}");
            }
            eprintln!("{} problem(s)", e.problems.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn serve(config: ClusterConfig, plugins: &Path) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("listen {}", config.listen))?;
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            log::info!("Shutdown requested.");
        };
        dispatch_cloud::serve::serve(config, plugins, listener, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn list_plugins(file: &Path, json: bool, check: bool) -> anyhow::Result<ExitCode> {
    let catalogue = Catalogue::load(file)?;
    if let Some(warning) = catalogue.readable_secrets() {
        eprintln!("warning: {warning}");
    }
    let mut refused = 0;
    let mut views = Vec::new();
    let mut loaded = Vec::new();
    for result in plugin::load_all(&catalogue) {
        match result {
            Ok(p) => {
                views.push(p.view());
                loaded.push(p);
            }
            Err(e) => {
                refused += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if check {
        // Opening a set is what `serve` does first: parameters, credentials, the cloud's
        // first answer. A set whose plugin did not load was reported above.
        for set in &catalogue.instance_sets {
            let Some(p) = loaded.iter().find(|p| p.name == set.driver) else {
                continue;
            };
            match p.new_instance_set(set, &Default::default()) {
                Ok(opened) => {
                    opened.stop();
                    eprintln!("instance set {}: OK", set.name);
                }
                Err(e) => {
                    refused += 1;
                    eprintln!(
                        "error: {}: instance set {} ({}): {e}",
                        file.display(),
                        set.name,
                        set.driver
                    );
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
    } else {
        println!(
            "{:<16} {:<12} {:<10} {:<8} {:<64} PATH",
            "NAME", "DRIVER", "VERSION", "ABI", "SHA256"
        );
        for v in &views {
            println!(
                "{:<16} {:<12} {:<10} {:<8} {:<64} {}",
                v.name, v.driver, v.driver_version, v.abi_version, v.sha256, v.path
            );
        }
    }
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn driver_test(
    file: &Path,
    set_name: &str,
    options: &conformance::Options,
    ssh_key: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let catalogue = Catalogue::load(file)?;
    let entry = catalogue
        .instance_set(set_name)
        .ok_or_else(|| anyhow!("{}: no instance set named {set_name:?}", file.display()))?
        .clone();
    let plugin_entry = catalogue
        .plugin(&entry.driver)
        .ok_or_else(|| anyhow!("{}: no plugin named {:?}", file.display(), entry.driver))?;
    let loaded = plugin::load(plugin_entry)?;
    let key = Arc::new(match ssh_key {
        Some(path) => {
            let key = russh::keys::PrivateKey::read_openssh_file(path)
                .with_context(|| format!("--ssh-key {}", path.display()))?;
            if key.is_encrypted() {
                bail!(
                    "--ssh-key {}: the key is passphrase-protected; give an unencrypted copy",
                    path.display()
                );
            }
            key
        }
        None => dispatch_cloud::ssh::generate_key().context("generating an SSH key")?,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    println!(
        "driver-test: plugin {} ({}), instance set {} ({})",
        loaded.name,
        loaded.path.display(),
        entry.name,
        entry.set_id
    );
    let steps = runtime.block_on(conformance::run(
        &loaded,
        &entry,
        key,
        options,
        &mut |step| println!("{step}"),
    ));
    let failed = steps.iter().filter(|s| !s.passed).count();
    println!("{} step(s), {failed} failed", steps.len());
    Ok(if failed == 0 && !steps.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
