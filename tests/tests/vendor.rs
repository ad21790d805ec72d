//! What a vendor does: build a driver crate that lives outside the workspace (its own
//! Cargo.toml, driver-abi by path), pin its hash, and pass the conformance kit with it.

use system_tests::*;

#[test]
fn a_driver_built_outside_the_workspace_passes_driver_test() {
    let so = build_fixture("vendor-driver", "libvendor_cloud.so");
    let cloud = LoopbackCloud::new();
    let file = write_plugins_toml(
        cloud.state_dir(),
        &format!(
            "[[plugins]]\nname = \"acme\"\npath = {:?}\nsha256 = \"{}\"\n\n\
             [[instance_sets]]\nname = \"acme-set\"\ndriver = \"acme\"\nset_id = \"zzzzz-zzzzz-vendordriver000\"\n\
             [instance_sets.parameters]\n{}",
            so.display().to_string(),
            sha256_hex(&so),
            cloud.parameters_toml("")
        ),
    );
    let file = file.to_str().expect("utf8");
    let listed = cli(&["plugins", "--json", "--plugins", file]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(list[0]["driver"], "vendor");
    assert_eq!(list[0]["driver_version"], "2.0.0");

    let out = cli(&[
        "driver-test",
        "--plugins",
        file,
        "--instance-set",
        "acme-set",
        "--command",
        "echo vendor-ok",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("driver vendor 2.0.0"), "{stdout}");
    assert!(
        stdout.contains("PASS boot probe over verified SSH"),
        "{stdout}"
    );
    assert!(stdout.contains("vendor-ok"), "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}
