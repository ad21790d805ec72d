//! Loading driver plugins: hash, open, check the ABI, attach the host's services.
//!
//! The file is resolved, checked (owned by root or this user, writable by nobody else, in
//! directories nobody else can write) and opened once; that descriptor is hashed and that same
//! descriptor is loaded (`/proc/self/fd/N`), so what was hashed is what runs, however the path
//! changes meanwhile. The descriptor stays open for the process's life, like the library.
//!
//! Each library is opened with `lib_header_from_path` + `init_root_module`, never with
//! `RootModule::load_from_file`: the latter caches one module per interface type for the whole
//! process, so a second driver would silently come back as the first. Libraries are never
//! unloaded (their code may still be on some thread's stack).

pub mod catalogue;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use driver_abi::ffi::{DriverModuleRef, ABI_VERSION};
use driver_abi::import::ImportedDriver;
use driver_abi::{DriverError, InstanceSet};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use catalogue::{Catalogue, CatalogueError, InstanceSetEntry, PluginEntry};

/// Why a plugin was refused: one sentence each; the full abi_stable report goes to the debug log.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {name}: {} does not exist", path.display())]
    Missing { name: String, path: PathBuf },
    #[error("plugin {name}: {} {reason}; refusing to load it", path.display())]
    Insecure {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin {name}: cannot read {}: {source}", path.display())]
    Unreadable {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "plugin {name}: {} has sha256 {actual}, but plugins.toml pins {expected}; refusing to load it",
        path.display()
    )]
    HashMismatch {
        name: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("plugin {name}: {} is not a dispatch-cloud driver plugin ({detail})", path.display())]
    NotAPlugin {
        name: String,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "plugin {name}: {} was built against driver-abi {plugin_version}, this host has {host_version}: {detail}",
        path.display()
    )]
    Incompatible {
        name: String,
        path: PathBuf,
        plugin_version: String,
        host_version: String,
        detail: String,
    },
}

/// A driver library that passed every check.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// Name in the catalogue.
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    /// What the driver calls itself, and its version.
    pub driver_name: String,
    pub driver_version: String,
    /// The `driver-abi` version the plugin was built against.
    pub abi_version: String,
    driver: ImportedDriver,
}

/// What `dispatch-cloud plugins --json` prints per plugin.
#[derive(Debug, Serialize)]
pub struct PluginView {
    pub name: String,
    pub driver: String,
    pub driver_version: String,
    pub abi_version: String,
    pub path: String,
    pub sha256: String,
}

impl LoadedPlugin {
    pub fn view(&self) -> PluginView {
        PluginView {
            name: self.name.clone(),
            driver: self.driver_name.clone(),
            driver_version: self.driver_version.clone(),
            abi_version: self.abi_version.clone(),
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
        }
    }

    /// Creates an instance set on this driver. Blocking: call from a blocking thread.
    pub fn new_instance_set(
        &self,
        entry: &InstanceSetEntry,
        shared_tags: &driver_abi::Tags,
    ) -> Result<Box<dyn InstanceSet>, DriverError> {
        self.driver
            .new_instance_set(&entry.parameters, &entry.set_id, shared_tags)
    }
}

/// Plugin files handed to the loader by this process, kept open for its life: each library was
/// loaded through its descriptor's path (`/proc/self/fd/N`), which must keep naming that file.
static LOADED_FILES: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Resolves, checks and opens the plugin file once.
fn open_checked(name: &str, path: &Path) -> Result<File, LoadError> {
    let insecure = |reason: String| LoadError::Insecure {
        name: name.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let real = driver_abi::trust::check_trusted_file(path).map_err(insecure)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&real)
        .map_err(|source| LoadError::Unreadable {
            name: name.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
    // What was opened is what counts (the path could have changed since the check).
    let meta = file.metadata().map_err(|source| LoadError::Unreadable {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    driver_abi::trust::check_file(&meta).map_err(insecure)?;
    Ok(file)
}

fn sha256_of(mut file: &File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// One `Error:` block of an abi_stable layout report.
#[derive(Default)]
struct Mismatch {
    context: String,
    error: String,
    expected: Vec<String>,
    found: Vec<String>,
}

/// `field_name:x` + `type:T` lines become `x: T`; plain values stay as they are.
fn describe(lines: &[String]) -> String {
    let field = lines.iter().find_map(|l| l.strip_prefix("field_name:"));
    let ty = lines.iter().find_map(|l| l.strip_prefix("type:"));
    match (field, ty) {
        (Some(f), Some(t)) => format!("field `{f}: {t}`"),
        _ => lines.first().cloned().unwrap_or_default(),
    }
}

/// Cuts abi_stable's layout report (hundreds of lines) to the first difference an operator
/// can act on: preferably a field that differs, with the type that holds it.
fn summarize_abi_report(report: &str) -> String {
    enum Section {
        None,
        Expected,
        Found,
    }
    let mut context = String::new();
    let mut awaiting_context = false;
    let mut blocks: Vec<Mismatch> = Vec::new();
    let mut section = Section::None;
    for raw in report.lines() {
        let line = raw.trim();
        if line.starts_with("Layout of expected type") {
            awaiting_context = true;
            continue;
        }
        if awaiting_context {
            if let Some(t) = line.strip_prefix("type:") {
                context = t.to_string();
                awaiting_context = false;
            }
            continue;
        }
        if let Some(error) = line.strip_prefix("Error:") {
            blocks.push(Mismatch {
                context: context.clone(),
                error: error.trim().to_string(),
                ..Default::default()
            });
            section = Section::None;
        } else if line == "Expected:" {
            section = Section::Expected;
        } else if line == "Found:" {
            section = Section::Found;
        } else if line.is_empty() || line.contains("error(s)") {
            section = Section::None;
        } else if let Some(block) = blocks.last_mut() {
            match section {
                Section::Expected => block.expected.push(line.to_string()),
                Section::Found => block.found.push(line.to_string()),
                Section::None => {}
            }
        }
    }
    let count = blocks.len();
    let chosen = blocks
        .iter()
        .find(|b| b.expected.iter().any(|l| l.starts_with("field_name:")))
        .or(blocks.first());
    match chosen {
        Some(b) => format!(
            "first mismatch in {}: {}: host expects {}, plugin has {} ({count} difference(s); \
             the full report is logged at debug level)",
            if b.context.is_empty() {
                "the root module"
            } else {
                &b.context
            },
            b.error,
            describe(&b.expected),
            describe(&b.found),
        ),
        None => first_line(report),
    }
}

/// Loads one plugin: the file must exist, match its pinned hash (checked before the library is
/// opened, so a tampered file never runs), export a dispatch-cloud root module, and have been
/// built against a compatible `driver-abi`.
pub fn load(entry: &PluginEntry) -> Result<LoadedPlugin, LoadError> {
    let name = entry.name.clone();
    let path = entry.path.clone();
    if !path.exists() {
        return Err(LoadError::Missing { name, path });
    }
    let file = open_checked(&name, &path)?;
    let sha256 = sha256_of(&file).map_err(|source| LoadError::Unreadable {
        name: name.clone(),
        path: path.clone(),
        source,
    })?;
    if let Some(expected) = &entry.sha256 {
        if *expected != sha256 {
            return Err(LoadError::HashMismatch {
                name,
                path,
                expected: expected.clone(),
                actual: sha256,
            });
        }
    }
    let not_a_plugin = |detail: String| LoadError::NotAPlugin {
        name: name.clone(),
        path: path.clone(),
        detail,
    };
    // The descriptor that was hashed, not the path: a file swapped in meanwhile is not loaded.
    let by_descriptor = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let header = lib_header_from_path(&by_descriptor);
    // Whatever came of it, the loader now knows a library by this descriptor's path and would
    // hand it out again for the same name: the descriptor is never closed, so its number is
    // never reused for another file.
    LOADED_FILES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(file);
    let header = header.map_err(|e| {
        log::debug!("plugin={name} abi_stable report:\n{e}");
        match e {
            LibraryError::OpenError { err, .. } => not_a_plugin(format!("cannot open it: {err}")),
            LibraryError::GetSymbolError { .. } => {
                not_a_plugin("it exports no abi_stable root module".into())
            }
            LibraryError::InvalidAbiHeader(h) => not_a_plugin(format!(
                "it was built with an incompatible abi_stable (header {h:?})"
            )),
            other => not_a_plugin(first_line(&other.to_string())),
        }
    })?;
    let plugin_version = header.version_strings().version.to_string();
    let incompatible = |detail: String| LoadError::Incompatible {
        name: name.clone(),
        path: path.clone(),
        plugin_version: plugin_version.clone(),
        host_version: ABI_VERSION.to_string(),
        detail,
    };
    if header.root_mod_consts().name() != DriverModuleRef::NAME {
        return Err(not_a_plugin(format!(
            "its root module is {:?}, not a dispatch-cloud driver",
            header.root_mod_consts().name()
        )));
    }
    let module = header.init_root_module::<DriverModuleRef>().map_err(|e| {
        let report = e.to_string();
        log::debug!("plugin={name} abi_stable report:\n{report}");
        match e {
            LibraryError::IncompatibleVersionNumber { .. } => incompatible(
                "the versions are not compatible (0.x plugins need the same minor version)".into(),
            ),
            LibraryError::AbiInstability(_) => incompatible(summarize_abi_report(&report)),
            _ => incompatible(first_line(&report)),
        }
    })?;
    if entry.sha256.is_none() {
        log::warn!(
            "plugin={name} {} is not pinned: add sha256 = \"{sha256}\" to its catalogue entry so a changed file is refused",
            path.display()
        );
    }
    let driver = ImportedDriver::new(module);
    let driver_name = driver.name();
    driver.attach_logger(&driver_name);
    log::info!(
        "Loaded plugin {name} (driver {driver_name} {}, driver-abi {plugin_version}) from {}.",
        driver.version(),
        path.display()
    );
    Ok(LoadedPlugin {
        name,
        path,
        sha256,
        driver_version: driver.version(),
        driver_name,
        abi_version: plugin_version.clone(),
        driver,
    })
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error")
        .to_string()
}

/// Loads every plugin of the catalogue; a refusal of one does not stop the others.
pub fn load_all(catalogue: &Catalogue) -> Vec<Result<LoadedPlugin, LoadError>> {
    catalogue.plugins.iter().map(load).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_reports_are_cut_to_the_first_differing_field() {
        let report = "\
Compatibility Error:
    Error:incompatible type size
    Expected:
        288
    Found:
        296
    9 error(s)inside:
    Layout of expected type:
        --- Type Layout ---
        type:FfiInstanceType
        size:152 align:8
    Error:too many fields
    Expected:
        10
    Found:
        11

    Error:unexpected field
    Expected:
        field_name:ram_bytes
        type:u64
    Found:
        field_name:gpu_vram_bytes
        type:u64
";
        assert_eq!(
            summarize_abi_report(report),
            "first mismatch in FfiInstanceType: unexpected field: host expects field \
             `ram_bytes: u64`, plugin has field `gpu_vram_bytes: u64` (3 difference(s); \
             the full report is logged at debug level)"
        );
        assert_eq!(
            summarize_abi_report("    Error:incompatible type size\n    Expected:\n        288\n    Found:\n        296\n"),
            "first mismatch in the root module: incompatible type size: host expects 288, \
             plugin has 296 (1 difference(s); the full report is logged at debug level)"
        );
    }

    #[test]
    fn missing_files_are_refused_before_anything_else() {
        let entry = PluginEntry {
            name: "ghost".into(),
            path: "/nonexistent/libghost.so".into(),
            sha256: None,
        };
        let err = load(&entry).err().expect("refused");
        assert_eq!(
            err.to_string(),
            "plugin ghost: /nonexistent/libghost.so does not exist"
        );
    }
}
