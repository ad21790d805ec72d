//! The `dispatch-cloud` command: parses flags and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use dispatch_cloud::conformance;
use dispatch_cloud::plugin::{self, Catalogue};

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

#[derive(Subcommand)]
enum Command {
    /// Load every plugin in plugins.toml and list what was found.
    Plugins {
        #[arg(long, default_value = "plugins.toml", env = "DISPATCH_CLOUD_PLUGINS")]
        plugins: PathBuf,
        /// One JSON array of {name, driver, driver_version, abi_version, path, sha256}.
        #[arg(long)]
        json: bool,
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
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Plugins { plugins, json } => list_plugins(&plugins, json),
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
            driver_test(&plugins, &instance_set, &options)
        }
    }
}

fn list_plugins(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let catalogue = Catalogue::load(file)?;
    let mut refused = 0;
    let mut views = Vec::new();
    for result in plugin::load_all(&catalogue) {
        match result {
            Ok(p) => views.push(p.view()),
            Err(e) => {
                refused += 1;
                eprintln!("error: {e}");
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
    file: &std::path::Path,
    set_name: &str,
    options: &conformance::Options,
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
    let key = Arc::new(dispatch_cloud::ssh::generate_key().context("generating an SSH key")?);
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
