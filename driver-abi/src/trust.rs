//! Whether a file is safe to load or execute: under the control of root or the user running
//! this process, and not replaceable by anyone else. The host checks plugin libraries this way
//! and drivers check their helper binaries the same way (the loopback daemon does).
//!
//! A directory others can write lets them swap the file; a sticky one (like `/tmp`) only lets
//! them add their own files, so it is accepted when root owns it.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The effective user of this process (the owner of its `/proc` entry).
fn effective_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn owner_trusted(uid: u32) -> bool {
    uid == 0 || Some(uid) == effective_uid()
}

/// Checks an opened (or looked-up) file itself: a regular file, owned by root or this user,
/// writable by nobody else. The error completes "… <path> ".
pub fn check_file(meta: &Metadata) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err("is not a regular file".into());
    }
    if !owner_trusted(meta.uid()) {
        return Err(format!(
            "is owned by uid {}, neither root nor this user",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Checks every directory above the resolved, absolute `path`.
pub fn check_directories(path: &Path) -> Result<(), String> {
    for dir in path.ancestors().skip(1) {
        let meta =
            std::fs::metadata(dir).map_err(|e| format!("lives in {}: {e}", dir.display()))?;
        if !owner_trusted(meta.uid()) {
            return Err(format!(
                "lives in {}, owned by uid {} (neither root nor this user)",
                dir.display(),
                meta.uid()
            ));
        }
        let writable_by_others = meta.mode() & 0o022 != 0;
        let sticky_root = meta.mode() & 0o1000 != 0 && meta.uid() == 0;
        if writable_by_others && !sticky_root {
            return Err(format!(
                "lives in {}, which group or others can write (mode {:o})",
                dir.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Resolves `path` (following symlinks) and checks the file it names and every directory
/// above it. Returns the resolved path, which is what should be opened.
pub fn check_trusted_file(path: &Path) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot be resolved: {e}"))?;
    check_directories(&real)?;
    let meta = std::fs::metadata(&real).map_err(|e| format!("cannot be read: {e}"))?;
    check_file(&meta)?;
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writable_files_and_directories_are_refused_symlinks_followed() {
        let dir = tempfile_dir();
        let good = dir.join("good.so");
        std::fs::write(&good, b"x").expect("write");
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(check_trusted_file(&good).is_ok());

        let open = dir.join("open.so");
        std::fs::write(&open, b"x").expect("write");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let err = check_trusted_file(&open).expect_err("world-writable file");
        assert!(err.contains("writable by group or others"), "{err}");

        let link = dir.join("link.so");
        std::os::unix::fs::symlink(&open, &link).expect("symlink");
        assert!(
            check_trusted_file(&link).is_err(),
            "a symlink to it is no better"
        );

        let shared = dir.join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let inside = shared.join("lib.so");
        std::fs::write(&inside, b"x").expect("write");
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = check_trusted_file(&inside).expect_err("world-writable directory");
        assert!(err.contains("which group or others can write"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A private directory under the system temp dir (no dev-dependency for one test).
    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "driver-abi-trust-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        dir
    }
}
