//! One loopback daemon carries 1,000 VMs: created, listed and destroyed through the plugin.
//! Prints the time taken and the daemon's resident memory (figures, not assertions: the
//! machines are shared). A measurement, not part of the default suite:
//! `cargo test -p system-tests --test scale -- --ignored --nocapture`.

use std::time::Instant;

use driver_abi::{CreateRequest, InstanceType, Tags};
use system_tests::*;

#[test]
#[ignore = "a measurement: cargo test -p system-tests --test scale -- --ignored --nocapture"]
fn one_daemon_holds_a_thousand_vms() {
    const VMS: usize = 1000;
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(&cloud, "zzzzz-zzzzz-thousandvms0000", "");
    let key = dispatch_cloud::ssh::generate_key().expect("key");
    let request = CreateRequest {
        instance_type: InstanceType::minimal("lb.tiny"),
        image_id: "img".into(),
        tags: Tags::new(),
        init_command: "true".into(),
        public_key: Some(key.public_key().to_openssh().expect("openssh")),
    };
    let started = Instant::now();
    for _ in 0..VMS {
        set.create(&request).expect("create");
    }
    let created = started.elapsed();
    let t = Instant::now();
    let listed = set.instances(&Tags::new()).expect("list");
    let list_time = t.elapsed();
    assert_eq!(listed.len(), VMS);
    let mut addresses: Vec<String> = listed.iter().map(|i| i.address()).collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), VMS, "every VM has its own port");
    let pid = cloud.daemon_pid().expect("daemon");
    let rss = rss_kib(pid).unwrap_or(0);
    let t = Instant::now();
    for vm in &listed {
        vm.destroy().expect("destroy");
    }
    let destroyed = t.elapsed();
    assert!(set.instances(&Tags::new()).expect("list").is_empty());
    println!(
        "{VMS} VMs: create {created:?}, list {list_time:?}, destroy {destroyed:?}; daemon RSS with {VMS} VMs: {:.1} MiB",
        rss as f64 / 1024.0
    );
}
