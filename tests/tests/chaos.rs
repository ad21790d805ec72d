//! The chaos run (`system_tests::chaos`) at a size the test suite can afford; the README shows
//! how to run it with 1,000 containers.

use system_tests::chaos::{run, ChaosOptions};

#[test]
fn every_container_ends_once_with_its_exit_code_under_faults_and_kill_9() {
    let report = run(&ChaosOptions {
        containers: 60,
        seed: 20_261_129,
    });
    assert_eq!(report.containers, 60);
    for fault in ["quota exceeded", "no capacity", "rate limited"] {
        assert!(
            report.faults_seen.contains(&fault),
            "the fault {fault:?} never showed: {report:?}"
        );
    }
}
