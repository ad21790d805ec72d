//! `cargo run -p system-tests --bin chaos -- --containers N [--seed S]`: the chaos run of
//! `system_tests::chaos` at any size (build the workspace first: it runs the built binaries
//! and plugins). Exits non-zero, saying why, when a container ended wrong or a VM was left.

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = system_tests::chaos::ChaosOptions {
        containers: 1000,
        seed: 0x5eed,
    };
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        let parsed = value.parse::<u64>();
        match (arg.as_str(), parsed) {
            ("--containers", Ok(n)) if n > 0 => opts.containers = n as usize,
            ("--seed", Ok(s)) => opts.seed = s,
            _ => {
                eprintln!("usage: chaos [--containers N] [--seed S] (got {arg} {value:?})");
                std::process::exit(2);
            }
        }
    }
    let report = system_tests::chaos::run(&opts);
    println!(
        "chaos: {} containers in {:.1} s (submission to last end {:.1} s, {:.1} containers/s); serve CPU {:.1} s; {} VMs lost (crashed or broken), {} containers reran after one ({} dispatch attempts recorded); faults seen: {:?}; every container ended once, Complete, with its own exit code; no VM left",
        report.containers,
        report.wall.as_secs_f64(),
        report.to_last_end.as_secs_f64(),
        report.containers_per_second(),
        report.serve_cpu.as_secs_f64(),
        report.vms_lost,
        report.reruns,
        report.dispatch_attempts,
        report.faults_seen,
    );
}
