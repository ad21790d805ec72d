//! The cluster config (TOML). Every value has a default, so the repository's own files suffice;
//! `check` reports every problem at once with file, line and key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use driver_abi::InstanceType;
use serde::{Deserialize, Deserializer, Serialize};

/// A byte count written as `1073741824`, `"1GiB"`, `"512MiB"`, `"10G"` or `"100M"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size like 4GiB"))?;
        let multiplier: f64 = match unit.trim() {
            "" | "B" => 1.0,
            "K" | "KB" => 1e3,
            "M" | "MB" => 1e6,
            "G" | "GB" => 1e9,
            "T" | "TB" => 1e12,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            other => return Err(format!("unknown size unit {other:?} in {text:?}")),
        };
        Ok(Size((number * multiplier).round() as u64))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => Size::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceTypeConfig {
    pub name: String,
    /// Defaults to `name`.
    #[serde(default)]
    pub provider_type: Option<String>,
    pub vcpus: u32,
    pub ram: Size,
    #[serde(default)]
    pub included_scratch: Size,
    #[serde(default)]
    pub added_scratch: Size,
    #[serde(default)]
    pub gpu_count: u32,
    #[serde(default)]
    pub gpu_kind: String,
    pub price: f64,
    #[serde(default)]
    pub preemptible: bool,
}

impl InstanceTypeConfig {
    pub fn to_instance_type(&self) -> InstanceType {
        InstanceType {
            name: self.name.clone(),
            provider_type: self
                .provider_type
                .clone()
                .unwrap_or_else(|| self.name.clone()),
            vcpus: self.vcpus,
            ram_bytes: self.ram.0,
            included_scratch_bytes: self.included_scratch.0,
            added_scratch_bytes: self.added_scratch.0,
            gpu_count: self.gpu_count,
            gpu_kind: self.gpu_kind.clone(),
            price: self.price,
            preemptible: self.preemptible,
        }
    }
}

/// Timeouts, in seconds (fractions allowed: tests compress minutes into milliseconds).
/// Names and defaults follow the original dispatcher's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    pub idle_seconds: f64,
    pub booting_seconds: f64,
    pub probe_seconds: f64,
    pub probe_interval_seconds: f64,
    pub sync_interval_seconds: f64,
    pub shutdown_seconds: f64,
    pub signal_seconds: f64,
    pub term_seconds: f64,
    pub stale_lock_seconds: f64,
    pub quota_holdoff_seconds: f64,
    pub capacity_holdoff_seconds: f64,
    pub ssh_dial_seconds: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle_seconds: 60.0,
            booting_seconds: 600.0,
            probe_seconds: 600.0,
            probe_interval_seconds: 10.0,
            sync_interval_seconds: 60.0,
            shutdown_seconds: 10.0,
            signal_seconds: 5.0,
            term_seconds: 120.0,
            stale_lock_seconds: 60.0,
            quota_holdoff_seconds: 60.0,
            capacity_holdoff_seconds: 60.0,
            ssh_dial_seconds: 60.0,
        }
    }
}

pub fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Instances including pending creates; 0 = unlimited.
    pub max_instances: usize,
    /// Pacing of create/list/destroy/set_tags; 0 = unlimited.
    pub max_cloud_ops_per_second: f64,
    /// In-flight creates; 0 = unlimited.
    pub max_concurrent_instance_create_ops: usize,
    pub max_probes_per_second: f64,
    /// 0 = as many as fit.
    pub max_running_containers_per_instance: usize,
    /// Eligible types cost at most this times the cheapest fitting one.
    pub maximum_price_factor: f64,
    /// A container unlocked this many times is cancelled.
    pub max_dispatch_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances: 64,
            max_cloud_ops_per_second: 10.0,
            max_concurrent_instance_create_ops: 1,
            max_probes_per_second: 10.0,
            max_running_containers_per_instance: 0,
            maximum_price_factor: 1.5,
            max_dispatch_attempts: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Five lowercase letters or digits; prefixes container IDs.
    pub cluster_id: String,
    /// Everything `serve` writes lives here.
    pub state_dir: PathBuf,
    pub listen: String,
    /// Bearer tokens accepted by the API; empty = one generated into `<state_dir>/api-token`.
    pub tokens: Vec<String>,
    /// The plugin catalogue (relative to the current directory).
    pub plugins: PathBuf,
    /// Which `[[instance_sets]]` entry of the catalogue to run.
    pub instance_set: String,
    pub image: String,
    /// Appended to the boot script after the instance-secret line.
    pub instance_init_command: String,
    /// Exit 0 means booted.
    pub boot_probe_command: String,
    /// Added to every VM's tags.
    pub resource_tags: BTreeMap<String, String>,
    /// The dispatcher's SSH key; generated (0600) on first start when absent.
    pub ssh_key: Option<PathBuf>,
    /// A runner already installed on the VM image; unset = deploy this executable (by hash).
    pub runner_path: Option<String>,
    /// The queue's SQLite file; default `<state_dir>/queue.sqlite`.
    pub queue_path: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub instance_types: Vec<InstanceTypeConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        let t = |name: &str, vcpus: u32, ram_gib: u64, price: f64| InstanceTypeConfig {
            name: name.into(),
            provider_type: Some(format!("lb.{name}")),
            vcpus,
            ram: Size(ram_gib << 30),
            included_scratch: Size(10 << 30),
            added_scratch: Size(0),
            gpu_count: 0,
            gpu_kind: String::new(),
            price,
            preemptible: false,
        };
        ClusterConfig {
            cluster_id: "zzzzz".into(),
            state_dir: PathBuf::from(".dispatch-cloud"),
            listen: "127.0.0.1:9006".into(),
            tokens: Vec::new(),
            plugins: PathBuf::from("plugins.toml"),
            instance_set: "default".into(),
            image: "default".into(),
            instance_init_command: String::new(),
            boot_probe_command: "true".into(),
            resource_tags: BTreeMap::new(),
            ssh_key: None,
            runner_path: None,
            queue_path: None,
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            instance_types: vec![
                t("small", 1, 2, 0.02),
                t("medium", 2, 4, 0.04),
                t("large", 4, 8, 0.08),
            ],
        }
    }
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.key,
            self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// `section.key` for the assignment on `line` (1-based), from the nearest `[header]` above it.
fn key_at(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.saturating_sub(1)).copied().unwrap_or("");
    let key = here.split('=').next().unwrap_or("").trim().to_string();
    let section = lines[..line.saturating_sub(1).min(lines.len())]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').to_string());
    match section {
        Some(s) if !key.is_empty() => format!("{s}.{key}"),
        Some(s) => s,
        None => key,
    }
}

/// The line where `key = ` is first assigned after `[section]` (best effort, for semantic checks).
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
        })
        .map(|i| i + 1)
        .unwrap_or(1)
}

impl ClusterConfig {
    /// Loads `file`, or the defaults when `file` is None. Reports every problem at once.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(file) = file else {
            return Ok(ClusterConfig::default());
        };
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            problems: vec![Problem {
                file: file.to_path_buf(),
                line: 0,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        // serde stops at the first bad key; blank that line out and go again, so one run
        // reports them all.
        let mut working = text.to_string();
        let mut config = None;
        // Lines blanked so far (1-based), to tell a table's own errors from their echoes.
        let mut blanked: Vec<usize> = Vec::new();
        for _ in 0..100 {
            match toml::from_str::<ClusterConfig>(&working) {
                Ok(c) => {
                    config = Some(c);
                    break;
                }
                Err(e) => {
                    let Some(span) = e.span() else {
                        problems.push(Problem {
                            file: file.to_path_buf(),
                            line: 0,
                            key: String::new(),
                            message: e.message().to_string(),
                        });
                        break;
                    };
                    let line = line_at(&working, span.start);
                    let mut lines: Vec<String> = working.lines().map(String::from).collect();
                    let Some(bad) = lines.get(line.saturating_sub(1)).cloned() else {
                        problems.push(Problem {
                            file: file.to_path_buf(),
                            line,
                            key: String::new(),
                            message: e.message().to_string(),
                        });
                        break;
                    };
                    if bad.trim().is_empty() || bad.trim_start().starts_with('#') {
                        // Nothing left to remove: the problem is structural.
                        problems.push(Problem {
                            file: file.to_path_buf(),
                            line,
                            key: key_at(&working, line),
                            message: e.message().to_string(),
                        });
                        break;
                    }
                    if bad.trim_start().starts_with('[') {
                        // An error about a whole table (e.g. a missing field): drop the table.
                        // If we blanked one of its lines ourselves, the error is only the echo
                        // of a problem already reported.
                        let end = (line..lines.len())
                            .find(|&i| lines[i].trim_start().starts_with('['))
                            .unwrap_or(lines.len());
                        let echo = blanked.iter().any(|b| *b > line && *b <= end);
                        if !echo {
                            problems.push(Problem {
                                file: file.to_path_buf(),
                                line,
                                key: bad
                                    .trim()
                                    .trim_matches(|c| c == '[' || c == ']')
                                    .to_string(),
                                message: e.message().to_string(),
                            });
                        }
                        for l in &mut lines[line - 1..end] {
                            l.clear();
                        }
                    } else {
                        problems.push(Problem {
                            file: file.to_path_buf(),
                            line,
                            key: key_at(&working, line),
                            message: e.message().to_string(),
                        });
                        lines[line - 1].clear();
                        blanked.push(line);
                    }
                    working = lines.join("\n");
                }
            }
        }
        if let Some(c) = &config {
            problems.extend(c.semantic_problems(file, text));
        }
        match config {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(ConfigError { problems }),
        }
    }

    fn semantic_problems(&self, file: &Path, text: &str) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |key: &str, message: String| {
            let leaf = key.rsplit('.').next().unwrap_or(key);
            out.push(Problem {
                file: file.to_path_buf(),
                line: line_of_key(text, leaf),
                key: key.to_string(),
                message,
            })
        };
        if self.cluster_id.len() != 5
            || !self
                .cluster_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            problem(
                "cluster_id",
                format!(
                    "{:?} must be 5 lowercase letters or digits",
                    self.cluster_id
                ),
            );
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problem(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:9006", self.listen),
            );
        }
        if self.instance_types.is_empty() {
            problem(
                "instance_types",
                "at least one instance type is needed".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.instance_types.iter().enumerate() {
            if !names.insert(t.name.clone()) {
                problem(
                    &format!("instance_types[{i}].name"),
                    format!("{:?} is declared twice", t.name),
                );
            }
            if t.vcpus == 0 {
                problem(
                    &format!("instance_types[{i}].vcpus"),
                    "must be at least 1".into(),
                );
            }
            if t.ram.0 == 0 {
                problem(
                    &format!("instance_types[{i}].ram"),
                    "must be more than 0".into(),
                );
            }
            if t.price.is_nan() || t.price < 0.0 {
                problem(
                    &format!("instance_types[{i}].price"),
                    "must be 0 or more".into(),
                );
            }
        }
        let timeouts = [
            ("timeouts.idle_seconds", self.timeouts.idle_seconds),
            ("timeouts.booting_seconds", self.timeouts.booting_seconds),
            ("timeouts.probe_seconds", self.timeouts.probe_seconds),
            (
                "timeouts.probe_interval_seconds",
                self.timeouts.probe_interval_seconds,
            ),
            (
                "timeouts.sync_interval_seconds",
                self.timeouts.sync_interval_seconds,
            ),
            ("timeouts.signal_seconds", self.timeouts.signal_seconds),
        ];
        for (key, v) in timeouts {
            if v.is_nan() || v <= 0.0 {
                problem(key, format!("{v} must be more than 0"));
            }
        }
        if self.limits.maximum_price_factor < 1.0 {
            problem("limits.maximum_price_factor", "must be at least 1".into());
        }
        if self.limits.max_probes_per_second.is_nan() || self.limits.max_probes_per_second <= 0.0 {
            problem("limits.max_probes_per_second", "must be more than 0".into());
        }
        out
    }

    pub fn instance_types(&self) -> Vec<InstanceType> {
        self.instance_types
            .iter()
            .map(InstanceTypeConfig::to_instance_type)
            .collect()
    }

    pub fn queue_path(&self) -> PathBuf {
        self.queue_path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("queue.sqlite"))
    }

    pub fn ssh_key_path(&self) -> PathBuf {
        self.ssh_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ssh_key"))
    }

    pub fn token_path(&self) -> PathBuf {
        self.state_dir.join("api-token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_the_usual_units() {
        assert_eq!(Size::parse("1GiB").expect("ok").0, 1 << 30);
        assert_eq!(Size::parse("512MiB").expect("ok").0, 512 << 20);
        assert_eq!(Size::parse("10G").expect("ok").0, 10_000_000_000);
        assert_eq!(Size::parse("123").expect("ok").0, 123);
        assert!(Size::parse("12 parsecs").is_err());
    }

    #[test]
    fn an_empty_file_is_the_default() {
        let c = ClusterConfig::parse(Path::new("c.toml"), "").expect("defaults");
        assert_eq!(c, ClusterConfig::default());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_line_and_key() {
        let text = "cluster_id = \"ZZ\"\nlisten = \"nowhere\"\nbogus = 1\n\n[timeouts]\nidle_seconds = \"soon\"\nprobe_seconds = 0\n\n[[instance_types]]\nname = \"a\"\nvcpus = 0\nram = \"1 parsec\"\nprice = 1.0\n";
        let err = ClusterConfig::parse(Path::new("/etc/c.toml"), text).expect_err("bad");
        let shown = err.to_string();
        for needle in [
            "/etc/c.toml:3: bogus: unknown field `bogus`",
            "/etc/c.toml:6: timeouts.idle_seconds:",
            "/etc/c.toml:12: instance_types.ram:",
        ] {
            assert!(shown.contains(needle), "{needle:?} missing from:\n{shown}");
        }
        // Semantic checks only run once the file parses; the syntax-level ones above came first.
        assert!(err.problems.len() >= 3, "{shown}");
    }

    #[test]
    fn a_table_missing_a_field_is_reported_once_and_later_tables_still_checked() {
        let text = "[[instance_types]]\nname = \"a\"\nvcpus = 1\nprice = 1.0\n[limits]\nmax_instances = \"many\"\n";
        let err = ClusterConfig::parse(Path::new("c.toml"), text).expect_err("bad");
        let shown: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:#?}");
        assert!(
            shown[0].starts_with("c.toml:1: instance_types: missing field `ram`"),
            "{shown:#?}"
        );
        assert!(
            shown[1].starts_with("c.toml:6: limits.max_instances:"),
            "{shown:#?}"
        );
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let text = "cluster_id = \"ZZ\"\nlisten = \"nowhere\"\n[timeouts]\nprobe_seconds = 0\n[[instance_types]]\nname = \"a\"\nvcpus = 0\nram = \"1GiB\"\nprice = 1.0\n";
        let err = ClusterConfig::parse(Path::new("c.toml"), text).expect_err("bad");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "cluster_id",
                "listen",
                "instance_types[0].vcpus",
                "timeouts.probe_seconds"
            ]
        );
        assert_eq!(err.problems[0].line, 1);
        assert_eq!(err.problems[3].line, 4);
    }
}
