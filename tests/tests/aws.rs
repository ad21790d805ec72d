//! The AWS driver's real `.so` against moto (`moto_server`, the EC2 emulator from PyPI) on
//! 127.0.0.1: the conformance kit without SSH, set isolation, pagination, subnet fail-over,
//! key-pair reuse, spot request shape and user data — checked against what moto recorded.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use dispatch_cloud::plugin::{self, Catalogue, LoadedPlugin};
use driver_abi::{CreateRequest, InstanceSet, InstanceType, Tags};
use system_tests::*;

fn aws_so() -> std::path::PathBuf {
    built("libdispatch_cloud_aws.so")
}

/// A machine image moto knows.
fn some_image(moto: &MotoServer) -> String {
    xml_value(&moto.call("DescribeImages", &[]), "imageId").expect("moto lists images")
}

fn catalogue(dir: &std::path::Path, moto: &MotoServer, sets: &[(&str, &str, &str)]) -> Catalogue {
    let mut text = pinned_plugin_entry("aws", &aws_so());
    for (name, set_id, extra) in sets {
        text.push_str(&format!(
            "\n[[instance_sets]]\nname = \"{name}\"\ndriver = \"aws\"\nset_id = \"{set_id}\"\n[instance_sets.parameters]\nregion = \"us-east-1\"\nendpoint = \"{}\"\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n{extra}\n",
            moto.endpoint
        ));
    }
    let file = write_plugins_toml(dir, &text);
    Catalogue::load(&file).expect("catalogue")
}

fn open(loaded: &LoadedPlugin, c: &Catalogue, name: &str) -> Arc<dyn InstanceSet> {
    Arc::from(
        loaded
            .new_instance_set(c.instance_set(name).expect("set"), &Tags::new())
            .expect("instance set"),
    )
}

fn request(image: &str, t: InstanceType, key: Option<String>) -> CreateRequest {
    let mut tags = Tags::new();
    tags.insert("purpose".into(), "test".into());
    CreateRequest {
        instance_type: t,
        image_id: image.into(),
        tags,
        init_command: "echo hello from init".into(),
        public_key: key,
    }
}

#[test]
fn the_real_so_passes_driver_test_against_moto() {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let image = some_image(&moto);
    catalogue(
        dir.path(),
        &moto,
        &[("ec2", "zzzzz-zzzzz-awsconformance0", "")],
    );
    let file = dir.path().join("plugins.toml");
    assert_driver_test_passes(&file, "ec2", "t3.micro", &image, &[]);
}

#[test]
fn sets_are_isolated_listings_paginate_and_keys_are_reused() {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let image = some_image(&moto);
    let c = catalogue(
        dir.path(),
        &moto,
        &[
            ("a", "zzzzz-zzzzz-awsseta00000000", "page_size = 5"),
            ("b", "zzzzz-zzzzz-awssetb00000000", ""),
        ],
    );
    let loaded = plugin::load(c.plugin("aws").expect("entry")).expect("the .so loads");
    assert_eq!(loaded.driver_name, "aws");
    let a = open(&loaded, &c, "a");
    let b = open(&loaded, &c, "b");
    let key = test_public_key();
    for _ in 0..12 {
        a.create(&request(
            &image,
            InstanceType::minimal("t3.micro"),
            Some(key.clone()),
        ))
        .expect("create in a");
    }
    b.create(&request(
        &image,
        InstanceType::minimal("t3.micro"),
        Some(key.clone()),
    ))
    .expect("create in b");

    // Moto pages DescribeInstances at MaxResults: 12 in pages of 5 needs the NextToken loop.
    let first_page = moto.call(
        "DescribeInstances",
        &[
            ("MaxResults", "5"),
            ("Filter.1.Name", "tag:dispatch-cloud-instance-set"),
            ("Filter.1.Value.1", "zzzzz-zzzzz-awsseta00000000"),
        ],
    );
    assert!(
        xml_value(&first_page, "nextToken").is_some(),
        "moto did not paginate"
    );
    let listed_a = a.instances(&Tags::new()).expect("list a");
    assert_eq!(listed_a.len(), 12);
    let listed_b = b.instances(&Tags::new()).expect("list b");
    assert_eq!(listed_b.len(), 1);
    assert!(listed_b
        .iter()
        .all(|i| !listed_a.iter().any(|j| j.id() == i.id())));

    // The key was imported once and found again by fingerprint for every later create.
    let keys = moto.call("DescribeKeyPairs", &[]);
    assert_eq!(
        keys.matches("<keyName>dispatch-cloud-").count(),
        1,
        "{keys}"
    );

    for i in listed_a.iter().chain(listed_b.iter()) {
        i.destroy().expect("destroy");
    }
    assert!(a.instances(&Tags::new()).expect("list").is_empty());
    assert!(b.instances(&Tags::new()).expect("list").is_empty());
}

#[test]
fn subnet_fail_over_spot_shape_and_user_data_reach_ec2() {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let image = some_image(&moto);
    let vpc = xml_value(
        &moto.call("CreateVpc", &[("CidrBlock", "10.0.0.0/16")]),
        "vpcId",
    )
    .expect("vpc");
    let subnet = xml_value(
        &moto.call(
            "CreateSubnet",
            &[("VpcId", vpc.as_str()), ("CidrBlock", "10.0.1.0/24")],
        ),
        "subnetId",
    )
    .expect("subnet");
    let c = catalogue(
        dir.path(),
        &moto,
        &[(
            "s",
            "zzzzz-zzzzz-awssubnets00000",
            &format!("subnet_ids = [\"subnet-0000000000bogus0\", \"{subnet}\"]\nebs_volume_type = \"gp3\""),
        )],
    );
    let loaded = plugin::load(c.plugin("aws").expect("entry")).expect("load");
    let set = open(&loaded, &c, "s");
    let spot = InstanceType {
        preemptible: true,
        price: 0.05,
        added_scratch_bytes: 50 << 30,
        ..InstanceType::minimal("m5.large")
    };
    let vm = set
        .create(&request(&image, spot, None))
        .expect("create fails over to the real subnet");
    let described = moto.call("DescribeInstances", &[("InstanceId.1", vm.id().as_str())]);
    assert_eq!(
        xml_value(&described, "subnetId").as_deref(),
        Some(subnet.as_str()),
        "{described}"
    );
    assert_eq!(
        xml_value(&described, "instanceLifecycle").as_deref(),
        Some("spot"),
        "{described}"
    );
    assert!(
        described.contains("<deviceName>/dev/xvdt</deviceName>"),
        "no scratch volume: {described}"
    );
    assert!(!vm.address().is_empty(), "private IP as address");
    assert_eq!(
        set.quota_group(&InstanceType {
            preemptible: true,
            ..InstanceType::minimal("m5.large")
        }),
        "standard-spot"
    );

    let attr = moto.call(
        "DescribeInstanceAttribute",
        &[("InstanceId", vm.id().as_str()), ("Attribute", "userData")],
    );
    let user_data = xml_value(&attr, "value").expect("user data");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(user_data.trim())
        .expect("base64");
    assert_eq!(
        String::from_utf8_lossy(&decoded),
        "#!/bin/sh\necho hello from init\n"
    );

    // The working subnet is remembered: the next create goes straight there.
    let second = set
        .create(&request(&image, InstanceType::minimal("t3.micro"), None))
        .expect("second create");
    let described = moto.call(
        "DescribeInstances",
        &[("InstanceId.1", second.id().as_str())],
    );
    assert_eq!(
        xml_value(&described, "subnetId").as_deref(),
        Some(subnet.as_str())
    );
    vm.destroy().expect("destroy");
    second.destroy().expect("destroy");
}

#[test]
fn bad_credentials_and_parameters_are_named() {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let c = catalogue(
        dir.path(),
        &moto,
        &[("typo", "zzzzz-zzzzz-awstypo00000000", "regoin = \"x\"")],
    );
    // The same file with the secret key removed from the set.
    let text = std::fs::read_to_string(dir.path().join("plugins.toml")).expect("read");
    let half = write_plugins_toml(
        dir.path(),
        &text
            .replace("secret_access_key = \"testing\"\n", "")
            .replace("regoin = \"x\"\n", ""),
    );
    let c_half = Catalogue::load(&half).expect("catalogue");
    let loaded = plugin::load(c.plugin("aws").expect("entry")).expect("load");
    let err = loaded
        .new_instance_set(c.instance_set("typo").expect("set"), &Tags::new())
        .err()
        .expect("typo refused");
    assert_eq!(err.kind(), "invalid_config");
    assert!(err.to_string().contains("regoin"), "{err}");
    let err = loaded
        .new_instance_set(c_half.instance_set("typo").expect("set"), &Tags::new())
        .err()
        .expect("half the credentials refused");
    assert_eq!(err.kind(), "invalid_config");
    assert!(err.to_string().contains("secret_access_key"), "{err}");
}

/// IAM keys moto will check signatures against: a user allowed everything, two access keys.
/// Runs before moto starts checking (its first `INITIAL_NO_AUTH_ACTION_COUNT` requests).
fn moto_iam_keys(moto: &MotoServer) -> Vec<(String, String)> {
    let script = r#"
import json, sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="dispatcher")
iam.put_user_policy(UserName="dispatcher", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
keys = [iam.create_access_key(UserName="dispatcher")["AccessKey"] for _ in range(2)]
print(json.dumps([[k["AccessKeyId"], k["SecretAccessKey"]] for k in keys]))
"#;
    let out = std::process::Command::new(workspace_root().join(".venv/bin/python"))
        .args(["-c", script, &moto.endpoint])
        .output()
        .expect("run boto3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("keys")
}

fn delete_moto_key(moto: &MotoServer, signed_with: &(String, String), key_id: &str) {
    let script = r#"
import sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
iam.delete_access_key(UserName="dispatcher", AccessKeyId=sys.argv[4])
"#;
    let out = std::process::Command::new(workspace_root().join(".venv/bin/python"))
        .args([
            "-c",
            script,
            &moto.endpoint,
            &signed_with.0,
            &signed_with.1,
            key_id,
        ])
        .output()
        .expect("run boto3");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// With no keys configured the driver takes the instance role's from IMDSv2, signs with them
/// (moto checks every signature here), keeps them while they are fresh, and fetches new ones
/// before they expire.
#[test]
fn with_no_keys_the_instance_role_signs_and_is_refreshed_before_expiry() {
    let moto = MotoServer::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]);
    let keys = moto_iam_keys(&moto);
    let imds = ImdsFake::start();
    let dir = tempfile::tempdir().expect("tmp");
    let mut text = pinned_plugin_entry("aws", &aws_so());
    for (name, extra) in [
        ("role", format!("imds_endpoint = \"{}\"", imds.endpoint)),
        (
            "wrong",
            "access_key_id = \"AKIAWRONG\"\nsecret_access_key = \"wrong\"".to_string(),
        ),
    ] {
        text.push_str(&format!(
            "\n[[instance_sets]]\nname = \"{name}\"\ndriver = \"aws\"\nset_id = \"zzzzz-zzzzz-awsimds{name:0>8}\"\n[instance_sets.parameters]\nregion = \"us-east-1\"\nendpoint = \"{}\"\n{extra}\n",
            moto.endpoint
        ));
    }
    let c = Catalogue::load(&write_plugins_toml(dir.path(), &text)).expect("catalogue");
    let loaded = plugin::load(c.plugin("aws").expect("entry")).expect("load");

    // Moto really checks: keys it does not know are refused.
    let wrong = open(&loaded, &c, "wrong");
    let refused = wrong
        .instances(&Tags::new())
        .err()
        .expect("unknown keys refused");
    assert!(!refused.to_string().is_empty());

    // Valid 6 s past the driver's refresh margin (300 s): fresh for the first calls only.
    imds.serve_credentials(&keys[0].0, &keys[0].1, 306.0);
    let role = open(&loaded, &c, "role");
    role.instances(&Tags::new())
        .expect("signed with the role's keys");
    role.instances(&Tags::new()).expect("again");
    assert_eq!(
        imds.credential_fetches(),
        1,
        "fresh keys are kept: {:?}",
        imds.requests()
    );
    let tokens = imds
        .requests()
        .iter()
        .filter(|r| r["path"] == "/latest/api/token" && r["method"] == "PUT")
        .count();
    assert_eq!(tokens, 1, "IMDSv2: a session token first");

    // The role's keys rotate; the old ones stop working. Within 6 s the driver's copy is
    // inside its refresh margin and it fetches the new ones.
    imds.serve_credentials(&keys[1].0, &keys[1].1, 3600.0);
    delete_moto_key(&moto, &keys[1], &keys[0].0);
    eventually(
        "a call signed with the new keys",
        Duration::from_secs(30),
        || role.instances(&Tags::new()).is_ok() && imds.credential_fetches() >= 2,
    );

    // No role at all: the set is refused, saying why.
    let dead = ImdsFake::start();
    let text = text.replace(&imds.endpoint, &dead.endpoint);
    let c = Catalogue::load(&write_plugins_toml(dir.path(), &text)).expect("catalogue");
    let err = loaded
        .new_instance_set(c.instance_set("role").expect("set"), &Tags::new())
        .err()
        .expect("no credentials anywhere");
    assert_eq!(err.kind(), "invalid_config");
    assert!(err.to_string().contains("instance role"), "{err}");
}

/// With a web-identity token file (as EKS mounts one) the driver assumes the role through STS,
/// signs with what it gets (moto checks), and reads the file again when it refreshes: a
/// rotated token is the one sent next.
#[test]
fn a_web_identity_token_file_assumes_the_role_and_is_read_again_at_refresh() {
    let moto = MotoServer::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]);
    let keys = moto_iam_keys(&moto);
    let sts = StsFake::start();
    let dir = tempfile::tempdir().expect("tmp");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first-token\n").expect("token");
    let mut text = pinned_plugin_entry("aws", &aws_so());
    text.push_str(&format!(
        "\n[[instance_sets]]\nname = \"web\"\ndriver = \"aws\"\nset_id = \"zzzzz-zzzzz-awswebidentity0\"\n[instance_sets.parameters]\nregion = \"us-east-1\"\nendpoint = \"{}\"\nsts_endpoint = \"{}\"\nrole_arn = \"arn:aws:iam::123456789012:role/dispatcher\"\nweb_identity_token_file = {:?}\n",
        moto.endpoint,
        sts.endpoint,
        token_file.display().to_string()
    ));
    let c = Catalogue::load(&write_plugins_toml(dir.path(), &text)).expect("catalogue");
    let loaded = plugin::load(c.plugin("aws").expect("entry")).expect("load");

    // A token STS does not accept: the set is refused, naming the role's source.
    sts.serve_credentials("some-other-token", &keys[0].0, &keys[0].1, 3600.0);
    let err = loaded
        .new_instance_set(c.instance_set("web").expect("set"), &Tags::new())
        .err()
        .expect("refused token");
    assert_eq!(err.kind(), "invalid_config");
    assert!(
        err.to_string().contains("web-identity")
            && err.to_string().contains("InvalidIdentityToken"),
        "{err}"
    );

    // Valid 6 s past the refresh margin: fresh for the first calls only.
    sts.serve_credentials("first-token", &keys[0].0, &keys[0].1, 306.0);
    let web = open(&loaded, &c, "web");
    web.instances(&Tags::new())
        .expect("signed with the assumed role's keys");
    // The token rotates, and with it the keys; the old key stops working.
    std::fs::write(&token_file, "second-token\n").expect("token");
    sts.serve_credentials("second-token", &keys[1].0, &keys[1].1, 3600.0);
    delete_moto_key(&moto, &keys[1], &keys[0].0);
    eventually(
        "a call signed after the refresh",
        Duration::from_secs(30),
        || web.instances(&Tags::new()).is_ok(),
    );
    let calls = sts.requests();
    assert!(
        calls
            .iter()
            .all(|r| r["action"] == "AssumeRoleWithWebIdentity"
                && r["role"] == "arn:aws:iam::123456789012:role/dispatcher"
                && r["signed"] == false),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|r| r["token"] == "second-token"),
        "the rotated token was read again: {calls:?}"
    );
}
