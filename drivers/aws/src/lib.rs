//! The AWS EC2 driver: the EC2 Query API over HTTPS (reqwest + rustls), signed with
//! `aws-sigv4`, XML parsed with quick-xml. About eight actions are all a dispatcher needs, so
//! it does without the 32 MB `aws-sdk-ec2`.

pub mod credentials;
pub mod ec2;
pub mod errors;
mod time;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use base64::Engine;
use driver_abi::{
    CreateRequest, Driver, DriverError, HostServices, Instance, InstancePrice, InstanceSet,
    InstanceSetId, InstanceType, Tags,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::credentials::{CredentialSource, Imds, Refreshing, WebIdentity};
use crate::ec2::{ApiError, Ec2Client};
use crate::errors::{classify, is_subnet_specific, Backoff};

/// The tag holding the set ID on every instance this driver creates.
pub const SET_ID_TAG: &str = "dispatch-cloud-instance-set";
/// Where an added scratch volume is attached.
const SCRATCH_DEVICE: &str = "/dev/xvdt";

fn default_quota_groups() -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = ["a", "c", "d", "h", "i", "m", "r", "t", "z"]
        .iter()
        .map(|p| (p.to_string(), "standard".to_string()))
        .collect();
    m.insert("vt".into(), "g".into());
    m.insert("p5".into(), "p5".into());
    m
}

fn default_admin_username() -> String {
    "ec2-user".into()
}

fn default_volume_type() -> String {
    "gp3".into()
}

fn default_timeout() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    region: String,
    /// Override for other partitions, VPC endpoints and emulators.
    endpoint: Option<String>,
    /// Static credentials; without them `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
    /// `AWS_SESSION_TOKEN` from the environment; without those, the instance role's from
    /// IMDSv2 at `imds_endpoint`.
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    /// Where IMDS answers (a test serves a fake on 127.0.0.1).
    imds_endpoint: Option<String>,
    /// A web-identity token file and the role to assume with it (STS
    /// `AssumeRoleWithWebIdentity`); default `AWS_WEB_IDENTITY_TOKEN_FILE` / `AWS_ROLE_ARN`.
    web_identity_token_file: Option<std::path::PathBuf>,
    role_arn: Option<String>,
    /// Default `https://sts.<region>.amazonaws.com/`.
    sts_endpoint: Option<String>,
    /// Tried in turn on subnet-specific errors; the one that worked is used first next time.
    #[serde(default)]
    subnet_ids: Vec<String>,
    #[serde(default)]
    security_group_ids: Vec<String>,
    #[serde(default = "default_admin_username")]
    admin_username: String,
    /// IAM instance profile name (or ARN).
    iam_instance_profile: Option<String>,
    #[serde(default = "default_volume_type")]
    ebs_volume_type: String,
    /// Instance type prefix → quota group (spot types get `-spot` appended).
    #[serde(default = "default_quota_groups")]
    instance_type_quota_groups: BTreeMap<String, String>,
    /// DescribeInstances page size (5–1000).
    page_size: Option<u32>,
    #[serde(default = "default_timeout")]
    request_timeout_seconds: u64,
}

pub struct AwsDriver;

impl Driver for AwsDriver {
    const NAME: &'static str = "aws";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new_instance_set(
        params: &serde_json::Value,
        set_id: &InstanceSetId,
        shared_tags: &Tags,
        _host: &HostServices,
    ) -> Result<Box<dyn InstanceSet>, DriverError> {
        let p: Params = driver_abi::parse_params(params)?;
        if p.region.trim().is_empty() {
            return Err(DriverError::invalid_config("region: must not be empty"));
        }
        if let Some(size) = p.page_size {
            if !(5..=1000).contains(&size) {
                return Err(DriverError::invalid_config(format!(
                    "page_size = {size}: must be 5 to 1000"
                )));
            }
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let credentials = match (&p.access_key_id, &p.secret_access_key) {
            (Some(k), Some(s)) => CredentialSource::Static(Credentials::new(
                k.clone(),
                s.clone(),
                p.session_token.clone(),
                None,
                "dispatch-cloud",
            )),
            (None, None) => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(k), Some(s)) => CredentialSource::Static(Credentials::new(
                    k,
                    s,
                    env("AWS_SESSION_TOKEN"),
                    None,
                    "environment",
                )),
                _ => {
                    let token_file = p
                        .web_identity_token_file
                        .clone()
                        .or_else(|| env("AWS_WEB_IDENTITY_TOKEN_FILE").map(Into::into));
                    let (source, what) = match token_file {
                        Some(file) => {
                            let role = p
                                .role_arn
                                .clone()
                                .or_else(|| env("AWS_ROLE_ARN"))
                                .unwrap_or_default();
                            let sts = p.sts_endpoint.clone().unwrap_or_else(|| {
                                format!("https://sts.{}.amazonaws.com/", p.region)
                            });
                            let web = WebIdentity::new(
                                &sts,
                                &role,
                                &file,
                                Duration::from_secs(p.request_timeout_seconds),
                            )
                            .map_err(DriverError::invalid_config)?;
                            (Refreshing::new(web), "the web-identity role")
                        }
                        None => {
                            let endpoint = p
                                .imds_endpoint
                                .as_deref()
                                .unwrap_or(credentials::DEFAULT_IMDS_ENDPOINT);
                            let imds = Imds::new(endpoint).map_err(DriverError::invalid_config)?;
                            (Refreshing::new(imds), "the instance role")
                        }
                    };
                    let source = CredentialSource::Refreshed(source);
                    // Asked now, so a host without a role fails at start, saying why.
                    source.current().map_err(|e| {
                        DriverError::invalid_config(format!(
                            "access_key_id / secret_access_key: not given, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set, and {what} gave none ({e})"
                        ))
                    })?;
                    source
                }
            },
            _ => {
                return Err(DriverError::invalid_config(
                    "access_key_id and secret_access_key: give both or neither",
                ))
            }
        };
        let endpoint = p
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://ec2.{}.amazonaws.com/", p.region));
        let client = Ec2Client::new(
            &endpoint,
            &p.region,
            credentials,
            Duration::from_secs(p.request_timeout_seconds),
        )
        .map_err(DriverError::other)?;
        log::info!("EC2 instance set {set_id} in {} via {endpoint}", p.region);
        Ok(Box::new(AwsSet {
            inner: Arc::new(SetInner {
                client,
                set_id: set_id.clone(),
                shared_tags: shared_tags.clone(),
                params: p,
                next_subnet: AtomicUsize::new(0),
                key_names: Mutex::new(BTreeMap::new()),
                create_backoff: Backoff::default(),
                list_backoff: Backoff::default(),
                other_backoff: Backoff::default(),
            }),
        }))
    }
}

#[cfg(feature = "export")]
driver_abi::export_driver!(AwsDriver);

struct SetInner {
    client: Ec2Client,
    set_id: InstanceSetId,
    shared_tags: Tags,
    params: Params,
    /// The subnet that worked last.
    next_subnet: AtomicUsize,
    /// Public key line → imported key pair name.
    key_names: Mutex<BTreeMap<String, String>>,
    create_backoff: Backoff,
    list_backoff: Backoff,
    other_backoff: Backoff,
}

/// Query parameters, in order.
type Query = Vec<(String, String)>;

fn push(q: &mut Query, k: impl Into<String>, v: impl Into<String>) {
    q.push((k.into(), v.into()));
}

fn push_tags(q: &mut Query, prefix: &str, tags: &Tags) {
    for (n, (k, v)) in tags.iter().enumerate() {
        push(q, format!("{prefix}.{}.Key", n + 1), k.clone());
        push(q, format!("{prefix}.{}.Value", n + 1), v.clone());
    }
}

/// Fingerprints EC2 may report for an ed25519 public key: base64 SHA-256 of the SSH key blob
/// (AWS, with and without padding) and colon-hex SHA-256 of the PKIX DER form (emulators).
pub fn key_fingerprints(public_key_line: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(blob) = public_key_line
        .split_whitespace()
        .nth(1)
        .and_then(|k| b64.decode(k).ok())
    else {
        return Vec::new();
    };
    let blob_hash = Sha256::digest(&blob);
    let openssh = b64.encode(blob_hash);
    let mut out = vec![openssh.trim_end_matches('=').to_string(), openssh];
    if blob.len() >= 32 {
        let mut der = hex::decode("302a300506032b6570032100").unwrap_or_default();
        der.extend_from_slice(&blob[blob.len() - 32..]);
        let hexed = hex::encode(Sha256::digest(&der));
        let colons: Vec<&str> = (0..hexed.len())
            .step_by(2)
            .map(|i| &hexed[i..i + 2])
            .collect();
        out.push(colons.join(":"));
    }
    out
}

impl SetInner {
    fn call(
        &self,
        action: &str,
        q: &Query,
        backoff: &Backoff,
        t: Option<&InstanceType>,
    ) -> Result<String, DriverError> {
        match self.client.call(action, q) {
            Ok(body) => {
                backoff.reset();
                Ok(body)
            }
            Err(e) => Err(self.error(action, &e, backoff, t)),
        }
    }

    fn error(
        &self,
        action: &str,
        e: &ApiError,
        backoff: &Backoff,
        t: Option<&InstanceType>,
    ) -> DriverError {
        let (type_name, group) = match t {
            Some(t) => (
                t.provider_type.clone(),
                quota_group(&self.params.instance_type_quota_groups, t),
            ),
            None => (String::new(), String::new()),
        };
        classify(action, e, backoff, &type_name, &group)
    }

    /// The key pair holding `public_key`, imported the first time.
    fn key_pair(&self, public_key: &str) -> Result<String, DriverError> {
        if let Some(name) = self
            .key_names
            .lock()
            .ok()
            .and_then(|m| m.get(public_key).cloned())
        {
            return Ok(name);
        }
        let fingerprints = key_fingerprints(public_key);
        if fingerprints.is_empty() {
            return Err(DriverError::invalid_config(
                "public key: not an OpenSSH ed25519 key line",
            ));
        }
        let body = self.call("DescribeKeyPairs", &Vec::new(), &self.other_backoff, None)?;
        let listed: ec2::DescribeKeyPairsResponse =
            ec2::parse("DescribeKeyPairs", &body).map_err(|e| DriverError::other(e.to_string()))?;
        let name = match listed
            .keys
            .item
            .iter()
            .find(|k| fingerprints.contains(&k.fingerprint))
        {
            Some(k) => k.name.clone(),
            None => {
                let name = format!(
                    "dispatch-cloud-{}",
                    &hex::encode(Sha256::digest(public_key.trim()))[..16]
                );
                let mut q = Vec::new();
                push(&mut q, "KeyName", name.clone());
                push(
                    &mut q,
                    "PublicKeyMaterial",
                    base64::engine::general_purpose::STANDARD.encode(public_key.trim()),
                );
                self.call("ImportKeyPair", &q, &self.other_backoff, None)?;
                log::info!("Imported the dispatcher's SSH key as key pair {name}");
                name
            }
        };
        if let Ok(mut m) = self.key_names.lock() {
            m.insert(public_key.to_string(), name.clone());
        }
        Ok(name)
    }

    fn run_instances_query(
        &self,
        r: &CreateRequest,
        tags: &Tags,
        key_name: Option<&str>,
        subnet: Option<&str>,
    ) -> Query {
        let t = &r.instance_type;
        let mut q = Vec::new();
        push(&mut q, "ImageId", r.image_id.clone());
        push(&mut q, "InstanceType", t.provider_type.clone());
        push(&mut q, "MinCount", "1");
        push(&mut q, "MaxCount", "1");
        push(&mut q, "InstanceInitiatedShutdownBehavior", "terminate");
        push(&mut q, "DisableApiTermination", "false");
        push(
            &mut q,
            "UserData",
            base64::engine::general_purpose::STANDARD
                .encode(format!("#!/bin/sh\n{}\n", r.init_command)),
        );
        push(&mut q, "MetadataOptions.HttpTokens", "required");
        push(&mut q, "MetadataOptions.HttpEndpoint", "enabled");
        push(&mut q, "TagSpecification.1.ResourceType", "instance");
        push_tags(&mut q, "TagSpecification.1.Tag", tags);
        if let Some(k) = key_name {
            push(&mut q, "KeyName", k);
        }
        if subnet.is_some() || !self.params.security_group_ids.is_empty() {
            push(&mut q, "NetworkInterface.1.DeviceIndex", "0");
            push(
                &mut q,
                "NetworkInterface.1.AssociatePublicIpAddress",
                "false",
            );
            push(&mut q, "NetworkInterface.1.DeleteOnTermination", "true");
            if let Some(s) = subnet {
                push(&mut q, "NetworkInterface.1.SubnetId", s);
            }
            for (n, g) in self.params.security_group_ids.iter().enumerate() {
                push(
                    &mut q,
                    format!("NetworkInterface.1.SecurityGroupId.{}", n + 1),
                    g.clone(),
                );
            }
        }
        if let Some(profile) = &self.params.iam_instance_profile {
            let key = if profile.starts_with("arn:") {
                "IamInstanceProfile.Arn"
            } else {
                "IamInstanceProfile.Name"
            };
            push(&mut q, key, profile.clone());
        }
        if t.added_scratch_bytes > 0 {
            let gib = t.added_scratch_bytes.div_ceil(1 << 30);
            push(&mut q, "BlockDeviceMapping.1.DeviceName", SCRATCH_DEVICE);
            push(
                &mut q,
                "BlockDeviceMapping.1.Ebs.VolumeSize",
                gib.to_string(),
            );
            push(
                &mut q,
                "BlockDeviceMapping.1.Ebs.VolumeType",
                self.params.ebs_volume_type.clone(),
            );
            push(
                &mut q,
                "BlockDeviceMapping.1.Ebs.DeleteOnTermination",
                "true",
            );
        }
        if t.preemptible {
            push(&mut q, "InstanceMarketOptions.MarketType", "spot");
            push(
                &mut q,
                "InstanceMarketOptions.SpotOptions.SpotInstanceType",
                "one-time",
            );
            push(
                &mut q,
                "InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior",
                "terminate",
            );
            if t.price > 0.0 {
                push(
                    &mut q,
                    "InstanceMarketOptions.SpotOptions.MaxPrice",
                    format!("{}", t.price),
                );
            }
        }
        q
    }

    fn instance(self: &Arc<Self>, item: ec2::InstanceItem) -> Box<dyn Instance> {
        let tags: Tags = item
            .tags
            .item
            .into_iter()
            .map(|t| (t.key, t.value))
            .collect();
        Box::new(AwsInstance {
            set: Arc::clone(self),
            id: item.instance_id,
            provider_type: item.instance_type,
            address: item.private_ip.unwrap_or_default(),
            spot: item.lifecycle.as_deref() == Some("spot"),
            zone: item
                .placement
                .map(|p| p.availability_zone)
                .unwrap_or_default(),
            tags: Mutex::new(tags),
        })
    }
}

/// The quota group of `t`: the longest configured prefix of its type that is at least as long
/// as its alphabetic family, else the family; `-spot` for preemptible capacity.
pub fn quota_group(groups: &BTreeMap<String, String>, t: &InstanceType) -> String {
    let lower = t.provider_type.to_lowercase();
    let family: String = lower
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    let group = groups
        .iter()
        .filter(|(prefix, _)| lower.starts_with(prefix.as_str()) && prefix.len() >= family.len())
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, g)| g.clone())
        .unwrap_or(family);
    if t.preemptible {
        format!("{group}-spot")
    } else {
        group
    }
}

struct AwsSet {
    inner: Arc<SetInner>,
}

impl InstanceSet for AwsSet {
    fn create(&self, request: &CreateRequest) -> Result<Box<dyn Instance>, DriverError> {
        let s = &self.inner;
        let mut tags = s.shared_tags.clone();
        tags.extend(request.tags.clone());
        tags.insert(SET_ID_TAG.into(), s.set_id.to_string());
        let key_name = match &request.public_key {
            Some(k) => Some(s.key_pair(k)?),
            None => None,
        };
        let subnets = &s.params.subnet_ids;
        let t = &request.instance_type;
        if subnets.is_empty() {
            let q = s.run_instances_query(request, &tags, key_name.as_deref(), None);
            return self.finish_create(s.call("RunInstances", &q, &s.create_backoff, Some(t))?);
        }
        let start = s.next_subnet.load(Ordering::Relaxed) % subnets.len();
        let mut last: Option<ApiError> = None;
        let mut last_capacity: Option<ApiError> = None;
        for n in 0..subnets.len() {
            let index = (start + n) % subnets.len();
            s.next_subnet.store(index, Ordering::Relaxed);
            let q =
                s.run_instances_query(request, &tags, key_name.as_deref(), Some(&subnets[index]));
            match s.client.call("RunInstances", &q) {
                Ok(body) => {
                    s.create_backoff.reset();
                    return self.finish_create(body);
                }
                Err(e) if is_subnet_specific(&e) && n + 1 < subnets.len() => {
                    log::info!(
                        "RunInstances in {} failed ({e}); trying the next subnet",
                        subnets[index]
                    );
                    if e.code == "InsufficientInstanceCapacity" {
                        last_capacity = Some(e.clone());
                    }
                    last = Some(e);
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let e = last_capacity.or(last).unwrap_or(ApiError {
            code: String::new(),
            message: "no subnet tried".into(),
            http_status: 0,
        });
        Err(s.error("RunInstances", &e, &s.create_backoff, Some(t)))
    }

    fn instances(&self, tag_filter: &Tags) -> Result<Vec<Box<dyn Instance>>, DriverError> {
        let s = &self.inner;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = Vec::new();
            let mut filters = vec![(format!("tag:{SET_ID_TAG}"), vec![s.set_id.to_string()])];
            for (k, v) in tag_filter {
                filters.push((format!("tag:{k}"), vec![v.clone()]));
            }
            filters.push((
                "instance-state-name".into(),
                ["pending", "running", "stopping", "stopped"]
                    .iter()
                    .map(|v| v.to_string())
                    .collect(),
            ));
            for (n, (name, values)) in filters.iter().enumerate() {
                push(&mut q, format!("Filter.{}.Name", n + 1), name.clone());
                for (m, v) in values.iter().enumerate() {
                    push(
                        &mut q,
                        format!("Filter.{}.Value.{}", n + 1, m + 1),
                        v.clone(),
                    );
                }
            }
            push(
                &mut q,
                "MaxResults",
                s.params.page_size.unwrap_or(1000).to_string(),
            );
            if let Some(t) = &token {
                push(&mut q, "NextToken", t.clone());
            }
            let body = s.call("DescribeInstances", &q, &s.list_backoff, None)?;
            let page: ec2::DescribeInstancesResponse = ec2::parse("DescribeInstances", &body)
                .map_err(|e| DriverError::other(e.to_string()))?;
            for r in page.reservations.item {
                for i in r.instances.item {
                    let state = i.state.as_ref().map(|st| st.name.as_str()).unwrap_or("");
                    if state == "terminated" || state == "shutting-down" {
                        continue;
                    }
                    out.push(s.instance(i));
                }
            }
            match page.next_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(out)
    }

    fn quota_group(&self, instance_type: &InstanceType) -> String {
        quota_group(&self.inner.params.instance_type_quota_groups, instance_type)
    }

    fn stop(&self) {}
}

impl AwsSet {
    fn finish_create(&self, body: String) -> Result<Box<dyn Instance>, DriverError> {
        let r: ec2::RunInstancesResponse =
            ec2::parse("RunInstances", &body).map_err(|e| DriverError::other(e.to_string()))?;
        let item = r
            .instances
            .item
            .into_iter()
            .next()
            .ok_or_else(|| DriverError::other("RunInstances returned no instance"))?;
        Ok(self.inner.instance(item))
    }
}

struct AwsInstance {
    set: Arc<SetInner>,
    id: String,
    provider_type: String,
    address: String,
    spot: bool,
    zone: String,
    /// What EC2 last reported (or we last set); `set_tags` diffs against it.
    tags: Mutex<Tags>,
}

impl Instance for AwsInstance {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn provider_type(&self) -> String {
        self.provider_type.clone()
    }

    fn tags(&self) -> Tags {
        self.tags.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn set_tags(&self, tags: &Tags) -> Result<(), DriverError> {
        let s = &self.set;
        let mut wanted = tags.clone();
        // Replacing tags must not orphan the instance from its set.
        wanted.insert(SET_ID_TAG.into(), s.set_id.to_string());
        let current = self.tags();
        let mut q = Vec::new();
        push(&mut q, "ResourceId.1", self.id.clone());
        push_tags(&mut q, "Tag", &wanted);
        s.call("CreateTags", &q, &s.other_backoff, None)?;
        let gone: Vec<&String> = current
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .collect();
        if !gone.is_empty() {
            let mut q = Vec::new();
            push(&mut q, "ResourceId.1", self.id.clone());
            for (n, k) in gone.iter().enumerate() {
                push(&mut q, format!("Tag.{}.Key", n + 1), (*k).clone());
            }
            s.call("DeleteTags", &q, &s.other_backoff, None)?;
        }
        if let Ok(mut t) = self.tags.lock() {
            *t = wanted;
        }
        Ok(())
    }

    fn destroy(&self) -> Result<(), DriverError> {
        let s = &self.set;
        let mut q = Vec::new();
        push(&mut q, "InstanceId.1", self.id.clone());
        s.call("TerminateInstances", &q, &s.other_backoff, None)
            .map(|_| ())
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn remote_user(&self) -> String {
        self.set.params.admin_username.clone()
    }

    fn verify_host_key(&self, _host_key: &str) -> Result<(), DriverError> {
        Err(DriverError::not_implemented(
            "EC2 does not publish host keys; the host checks the instance secret",
        ))
    }

    fn price_history(
        &self,
        instance_type: &InstanceType,
    ) -> Result<Vec<InstancePrice>, DriverError> {
        if !self.spot {
            return Ok(Vec::new());
        }
        let s = &self.set;
        let mut q = Vec::new();
        push(
            &mut q,
            "InstanceType.1",
            instance_type.provider_type.clone(),
        );
        push(&mut q, "ProductDescription.1", "Linux/UNIX");
        push(
            &mut q,
            "StartTime",
            time::format_rfc3339(SystemTime::now() - Duration::from_secs(3 * 24 * 3600)),
        );
        if !self.zone.is_empty() {
            push(&mut q, "AvailabilityZone", self.zone.clone());
        }
        let body = s.call(
            "DescribeSpotPriceHistory",
            &q,
            &s.other_backoff,
            Some(instance_type),
        )?;
        let r: ec2::DescribeSpotPriceHistoryResponse =
            ec2::parse("DescribeSpotPriceHistory", &body)
                .map_err(|e| DriverError::other(e.to_string()))?;
        let mut prices: Vec<InstancePrice> = r
            .prices
            .item
            .iter()
            .filter(|p| p.instance_type == instance_type.provider_type)
            .filter(|p| self.zone.is_empty() || p.availability_zone == self.zone)
            .filter_map(|p| {
                Some(InstancePrice {
                    start: time::parse_rfc3339(&p.timestamp)?,
                    price: p.spot_price.parse().ok()?,
                })
            })
            .collect();
        // Newest first, one point per start time.
        prices.sort_by_key(|p| std::cmp::Reverse(p.start));
        prices.dedup_by(|a, b| a.start == b.start);
        Ok(prices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(provider_type: &str, preemptible: bool) -> InstanceType {
        InstanceType {
            preemptible,
            ..InstanceType::minimal(provider_type)
        }
    }

    #[test]
    fn quota_groups_follow_the_family_and_configured_prefixes() {
        let g = default_quota_groups();
        assert_eq!(quota_group(&g, &t("m5.large", false)), "standard");
        assert_eq!(quota_group(&g, &t("m5.large", true)), "standard-spot");
        assert_eq!(quota_group(&g, &t("trn1.2xlarge", false)), "trn");
        assert_eq!(quota_group(&g, &t("p5.48xlarge", false)), "p5");
        assert_eq!(quota_group(&g, &t("vt1.3xlarge", false)), "g");
        assert_eq!(quota_group(&g, &t("g5.xlarge", false)), "g");
    }

    #[test]
    fn ed25519_fingerprints_in_every_form_ec2_uses() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test";
        let f = key_fingerprints(line);
        assert_eq!(f.len(), 3);
        assert!(!f[0].ends_with('='));
        assert_eq!(format!("{}=", f[0]), f[1]);
        assert_eq!(f[2].len(), 32 * 3 - 1, "colon hex of SHA-256");
        assert!(key_fingerprints("not a key").is_empty());
    }
}
