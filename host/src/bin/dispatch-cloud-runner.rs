//! The runner alone: what the host deploys to every VM. It links only `runner` (no SQLite, HTTP
//! server, plugin loader or SSH client), so it is small to copy and quick to start. Called as
//! `dispatch-cloud-runner [runner] SUBCOMMAND…`, the same words `dispatch-cloud runner` takes.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match args.first().map(String::as_str) {
        Some("runner") => &args[1..],
        _ => &args[..],
    };
    match dispatch_cloud::runner::main(args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
