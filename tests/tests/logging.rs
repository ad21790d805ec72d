//! Plugin log lines reach the host's logger with the driver's name as the target.

use std::sync::Mutex;

use dispatch_cloud::plugin::{self, Catalogue};
use driver_abi::Tags;
use system_tests::*;

static LINES: Mutex<Vec<(String, log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if let Ok(mut lines) = LINES.lock() {
            lines.push((
                record.target().to_string(),
                record.level(),
                record.args().to_string(),
            ));
        }
    }
    fn flush(&self) {}
}

#[test]
fn driver_log_lines_carry_the_driver_name() {
    log::set_logger(&Capture).expect("first logger in this test binary");
    log::set_max_level(log::LevelFilter::Info);
    let dir = tempfile::tempdir().expect("tmp");
    let file = write_plugins_toml(
        dir.path(),
        &format!(
            "[[plugins]]\nname = \"probe-under-another-name\"\npath = {:?}\n\n[[instance_sets]]\nname = \"p\"\ndriver = \"probe-under-another-name\"\nset_id = \"zzzzz-zzzzz-logging00000000\"\n",
            probe_so().display().to_string()
        ),
    );
    let catalogue = Catalogue::load(&file).expect("catalogue");
    let probe = plugin::load(&catalogue.plugins[0]).expect("load");
    let _set = probe
        .new_instance_set(&catalogue.instance_sets[0], &Tags::new())
        .expect("set");
    let lines = LINES.lock().expect("lines").clone();
    assert!(
        lines.contains(&(
            "probe".to_string(),
            log::Level::Info,
            "probe instance set zzzzz-zzzzz-logging00000000 ready".to_string()
        )),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&(
            "probe".to_string(),
            log::Level::Warn,
            "probe says hello through host services".to_string()
        )),
        "{lines:#?}"
    );
}
