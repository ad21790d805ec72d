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

/// A vendor gets driver-abi as a package, not as a path into this repository: `cargo package`
/// makes it, it unpacks anywhere, and a driver crate elsewhere builds against it, runs its own
/// unit tests without a host (`HostServices::new`), and the host loads the result.
#[test]
fn a_driver_outside_the_repository_builds_against_the_packaged_driver_abi() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = fixtures_target();
    let packaged = std::process::Command::new(&cargo)
        .args([
            "package",
            "-p",
            "driver-abi",
            "--no-verify",
            "--allow-dirty",
        ])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(workspace_root())
        .output()
        .expect("run cargo package");
    assert!(packaged.status.success(), "{}", text(&packaged.stderr));
    let manifest = std::fs::read_to_string(workspace_root().join("driver-abi/Cargo.toml"))
        .expect("driver-abi manifest");
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("driver-abi version");
    let crate_file = target.join(format!("package/driver-abi-{version}.crate"));
    let elsewhere = tempfile::tempdir().expect("tmp");
    let unpacked = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&crate_file)
        .arg("-C")
        .arg(elsewhere.path())
        .output()
        .expect("run tar");
    assert!(unpacked.status.success(), "{}", text(&unpacked.stderr));
    let abi = elsewhere.path().join(format!("driver-abi-{version}"));
    let abi_manifest = std::fs::read_to_string(abi.join("Cargo.toml")).expect("manifest");
    assert!(
        !abi_manifest.contains(".workspace = true") && !abi_manifest.contains("workspace = true"),
        "the packaged manifest stands alone:\n{abi_manifest}"
    );

    let fixture = workspace_root().join("tests/fixtures/packaged-driver");
    let driver = elsewhere.path().join("packaged-driver");
    std::fs::create_dir_all(driver.join("src")).expect("mkdir");
    std::fs::copy(fixture.join("src/lib.rs"), driver.join("src/lib.rs")).expect("copy");
    let template = std::fs::read_to_string(fixture.join("Cargo.toml.in")).expect("template");
    std::fs::write(
        driver.join("Cargo.toml"),
        template.replace("@DRIVER_ABI@", &abi.display().to_string()),
    )
    .expect("manifest");
    cargo_on(&driver.join("Cargo.toml"), "test");
    cargo_on(&driver.join("Cargo.toml"), "build");
    let so = target.join("debug/libpackaged_cloud.so");
    let file = write_plugins_toml(
        elsewhere.path(),
        &format!(
            "[[plugins]]\nname = \"pool\"\npath = {:?}\nsha256 = \"{}\"\n\n\
             [[instance_sets]]\nname = \"lab\"\ndriver = \"pool\"\nset_id = \"zzzzz-zzzzz-packageddriver0\"\n",
            so.display().to_string(),
            sha256_hex(&so),
        ),
    );
    let file = file.to_str().expect("utf8");
    let listed = cli(&["plugins", "--json", "--check", "--plugins", file]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(list[0]["driver"], "empty-pool");
    assert_eq!(list[0]["driver_version"], "0.3.0");
    assert!(text(&listed.stderr).contains("instance set lab: OK"));
}
