//! `plugins.toml`: which driver libraries exist, and which instance sets to run on them.
//!
//! ```toml
//! [[plugins]]
//! name = "loopback"
//! path = "target/debug/libdispatch_cloud_loopback.so"  # or: directory = "/usr/lib/dispatch-cloud"
//! sha256 = "…"                                         # optional; refused on mismatch
//!
//! [[instance_sets]]
//! name = "default"
//! driver = "loopback"
//! set_id = "zzzzz-zzzzz-zzzzzzzzzzzzzzz"
//! [instance_sets.parameters]   # handed to the driver as JSON
//! state_dir = "/tmp/loopback"
//! ```
//! Relative paths are relative to the directory holding `plugins.toml`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use driver_abi::InstanceSetId;
use serde::Deserialize;
use toml::Spanned;

use crate::toml_lines::line_of;

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("{file}: cannot read: {source}")]
    Unreadable {
        file: PathBuf,
        source: std::io::Error,
    },
    /// toml's message already names the line, column and key.
    #[error("{file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}:{line}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    instance_sets: Vec<RawInstanceSet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Spanned<String>,
    path: Option<Spanned<String>>,
    directory: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstanceSet {
    name: Spanned<String>,
    driver: Spanned<String>,
    set_id: Spanned<String>,
    #[serde(default)]
    parameters: toml::Table,
}

/// One driver library the operator allows.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginEntry {
    pub name: String,
    /// The library file, resolved (not necessarily existing).
    pub path: PathBuf,
    /// Lowercase hex, when pinned.
    pub sha256: Option<String>,
}

/// One instance set to run.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSetEntry {
    pub name: String,
    /// The `name` of a plugin in the catalogue.
    pub driver: String,
    pub set_id: InstanceSetId,
    pub parameters: serde_json::Value,
}

#[derive(Clone, Debug)]
pub struct Catalogue {
    pub file: PathBuf,
    pub plugins: Vec<PluginEntry>,
    pub instance_sets: Vec<InstanceSetEntry>,
}

/// File names tried, in order, for a plugin found by `directory`.
fn library_names(name: &str) -> Vec<String> {
    let stem = name.replace('-', "_");
    vec![
        format!("libdispatch_cloud_{stem}.so"),
        format!("lib{stem}.so"),
        format!("{name}.so"),
    ]
}

impl Catalogue {
    pub fn load(file: &Path) -> Result<Self, CatalogueError> {
        let text = std::fs::read_to_string(file).map_err(|source| CatalogueError::Unreadable {
            file: file.to_path_buf(),
            source,
        })?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Self, CatalogueError> {
        let raw: RawCatalogue = toml::from_str(text).map_err(|e| CatalogueError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let invalid =
            |span: std::ops::Range<usize>, key: &str, message: String| CatalogueError::Invalid {
                file: file.to_path_buf(),
                line: line_of(text, span.start),
                key: key.to_string(),
                message,
            };

        let mut plugins = Vec::new();
        let mut seen = HashSet::new();
        for (i, p) in raw.plugins.into_iter().enumerate() {
            let key = |field: &str| format!("plugins[{i}].{field}");
            if !seen.insert(p.name.get_ref().clone()) {
                return Err(invalid(
                    p.name.span(),
                    &key("name"),
                    format!("plugin {:?} is declared twice", p.name.get_ref()),
                ));
            }
            let path = match (&p.path, &p.directory) {
                (Some(path), None) => base.join(path.get_ref()),
                (None, Some(dir)) => {
                    let dir = base.join(dir.get_ref());
                    let names = library_names(p.name.get_ref());
                    names
                        .iter()
                        .map(|n| dir.join(n))
                        .find(|candidate| candidate.is_file())
                        .unwrap_or_else(|| dir.join(&names[0]))
                }
                (Some(path), Some(_)) => {
                    return Err(invalid(
                        path.span(),
                        &key("path"),
                        "give either path or directory, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        p.name.span(),
                        &key("path"),
                        "missing: give path (the library file) or directory".into(),
                    ))
                }
            };
            let sha256 = match p.sha256 {
                Some(h) => {
                    let hex = h.get_ref().trim().to_ascii_lowercase();
                    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(invalid(
                            h.span(),
                            &key("sha256"),
                            format!("{:?} is not 64 hex digits", h.get_ref()),
                        ));
                    }
                    Some(hex)
                }
                None => None,
            };
            plugins.push(PluginEntry {
                name: p.name.into_inner(),
                path,
                sha256,
            });
        }

        let mut instance_sets = Vec::new();
        let mut seen_sets = HashSet::new();
        let mut seen_ids = HashSet::new();
        for (i, s) in raw.instance_sets.into_iter().enumerate() {
            let key = |field: &str| format!("instance_sets[{i}].{field}");
            if !seen_sets.insert(s.name.get_ref().clone()) {
                return Err(invalid(
                    s.name.span(),
                    &key("name"),
                    format!("instance set {:?} is declared twice", s.name.get_ref()),
                ));
            }
            if !seen.contains(s.driver.get_ref()) {
                return Err(invalid(
                    s.driver.span(),
                    &key("driver"),
                    format!("no plugin named {:?} in [[plugins]]", s.driver.get_ref()),
                ));
            }
            let set_id = InstanceSetId::parse(s.set_id.get_ref())
                .map_err(|m| invalid(s.set_id.span(), &key("set_id"), m))?;
            // Two sets with one ID would each adopt, and fight over, the other's VMs.
            if !seen_ids.insert(set_id.clone()) {
                return Err(invalid(
                    s.set_id.span(),
                    &key("set_id"),
                    format!("set ID {set_id} is used by another instance set"),
                ));
            }
            let parameters = serde_json::to_value(&s.parameters)
                .map_err(|e| invalid(s.name.span(), &key("parameters"), e.to_string()))?;
            instance_sets.push(InstanceSetEntry {
                name: s.name.into_inner(),
                driver: s.driver.into_inner(),
                set_id,
                parameters,
            });
        }
        Ok(Catalogue {
            file: file.to_path_buf(),
            plugins,
            instance_sets,
        })
    }

    /// Parameter keys that hold secrets, in any instance set (`secret_access_key`,
    /// `client_secret`, …), when the file is readable by group or others: a warning to give.
    pub fn readable_secrets(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&self.file).ok()?.permissions().mode();
        if mode & 0o044 == 0 {
            return None;
        }
        let secret = |k: &str| {
            let k = k.to_ascii_lowercase();
            ["secret", "password", "token", "private_key"]
                .iter()
                .any(|word| k.contains(word))
        };
        let keys: Vec<String> = self
            .instance_sets
            .iter()
            .flat_map(|set| {
                set.parameters
                    .as_object()
                    .into_iter()
                    .flat_map(|o| o.keys())
                    .filter(|k| secret(k))
                    .map(move |k| format!("{}.{k}", set.name))
            })
            .collect();
        (!keys.is_empty()).then(|| {
            format!(
                "{} holds secrets ({}) and is readable by others (mode {:o}): chmod 600 it, or let the driver take credentials from the environment or the instance's role",
                self.file.display(),
                keys.join(", "),
                mode & 0o777
            )
        })
    }

    pub fn plugin(&self, name: &str) -> Option<&PluginEntry> {
        self.plugins.iter().find(|p| p.name == name)
    }

    pub fn instance_set(&self, name: &str) -> Option<&InstanceSetEntry> {
        self.instance_sets.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn secrets_in_a_file_others_can_read_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("plugins.toml");
        std::fs::write(
            &file,
            "[[plugins]]\nname = \"aws\"\npath = \"/x.so\"\n[[instance_sets]]\nname = \"prod\"\ndriver = \"aws\"\nset_id = \"zzzzz-zzzzz-000000000000000\"\n[instance_sets.parameters]\nregion = \"x\"\nsecret_access_key = \"s\"\n",
        )
        .expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let c = Catalogue::load(&file).expect("load");
        let warning = c.readable_secrets().expect("a warning");
        assert!(warning.contains("prod.secret_access_key"), "{warning}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(c.readable_secrets(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Catalogue, String> {
        Catalogue::parse(Path::new("/etc/dc/plugins.toml"), text).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
[[plugins]]
name = "loopback"
path = "lib/libdispatch_cloud_loopback.so"
sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"

[[instance_sets]]
name = "default"
driver = "loopback"
set_id = "zzzzz-zzzzz-zzzzzzzzzzzzzzz"
[instance_sets.parameters]
state_dir = "/tmp/x"
faults = { boot_delay_ms = 5 }
"#;

    #[test]
    fn a_good_catalogue_resolves_paths_and_parameters() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(
            c.plugins[0].path,
            PathBuf::from("/etc/dc/lib/libdispatch_cloud_loopback.so")
        );
        assert_eq!(
            c.plugins[0].sha256.as_deref(),
            Some("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789")
        );
        let set = c.instance_set("default").expect("set");
        assert_eq!(set.parameters["faults"]["boot_delay_ms"], 5);
        assert_eq!(set.set_id.as_str(), "zzzzz-zzzzz-zzzzzzzzzzzzzzz");
    }

    /// Each row: a change to the good file, and what the error must say.
    #[test]
    fn refusals_name_file_line_and_key() {
        let rows: &[(&str, &str, &[&str])] = &[
            (
                "name = \"loopback\"\npath",
                "name = \"loopback\"\npaht",
                &["plugins.toml", "line 4", "paht"],
            ),
            (
                "zzzzz-zzzzz-zzzzzzzzzzzzzzz",
                "zzzzz-zzzzz-zzz",
                &["plugins.toml:10", "instance_sets[0].set_id", "5, 5 and 15"],
            ),
            (
                "driver = \"loopback\"",
                "driver = \"aws\"",
                &[":9:", "instance_sets[0].driver", "no plugin named \"aws\""],
            ),
            (
                "sha256 = \"ABCDEF",
                "sha256 = \"XYZ",
                &[":5:", "plugins[0].sha256", "64 hex digits"],
            ),
        ];
        for (from, to, expected) in rows {
            let text = GOOD.replacen(from, to, 1);
            let err = parse(&text).expect_err(to);
            for needle in *expected {
                assert!(err.contains(needle), "{to:?}: {err:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let twice = format!("{GOOD}\n[[plugins]]\nname = \"loopback\"\npath = \"x.so\"\n");
        let err = parse(&twice).expect_err("duplicate");
        assert!(err.contains("declared twice"), "{err}");
        assert!(err.contains(":16:"), "{err}");
    }

    #[test]
    fn directory_search_falls_back_to_the_conventional_name() {
        let c =
            parse("[[plugins]]\nname = \"my-cloud\"\ndirectory = \"/nonexistent\"\n").expect("ok");
        assert_eq!(
            c.plugins[0].path,
            PathBuf::from("/nonexistent/libdispatch_cloud_my_cloud.so")
        );
    }
}
