//! The instance-secret trick for drivers that cannot verify SSH host keys (EC2, Azure): at
//! create, the host makes a random secret, tags the VM with it and has the VM's init command
//! write it to a root-only file; on first connect it reads the file back and compares. The tag
//! survives a restart of the host, so verification does too.

/// The tag holding the secret.
pub const TAG: &str = "dispatch-cloud-instance-secret";

/// The file the init command writes. `${DISPATCH_CLOUD_VM_ROOT}` is empty on a real VM; the
/// loopback cloud sets it to the VM's root directory.
pub const FILE: &str = "${DISPATCH_CLOUD_VM_ROOT}/var/run/dispatch-cloud-instance-secret";

/// 40 hex digits from the OS's CSPRNG.
pub fn generate() -> String {
    hex::encode(rand::random::<[u8; 20]>())
}

/// The boot script that stores `secret`, followed by the operator's own init command.
pub fn init_command(secret: &str, then: &str) -> String {
    let mut script = format!(
        "umask 0177 && mkdir -p \"${{DISPATCH_CLOUD_VM_ROOT}}/var/run\" && printf %s {secret} > \"{FILE}\""
    );
    if !then.trim().is_empty() {
        script.push('\n');
        script.push_str(then);
    }
    script
}

/// The command that prints the secret (through sudo unless we log in as root).
pub fn read_command(remote_user: &str) -> String {
    let cat = format!("cat \"{FILE}\"");
    if remote_user == "root" {
        cat
    } else {
        format!("sudo {cat}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_40_hex_digits_and_differ() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 40);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn init_command_writes_then_runs_the_operators_script() {
        let script = init_command("abc", "echo hi");
        assert!(script.starts_with("umask 0177"));
        assert!(script.ends_with("\necho hi"));
        assert!(!init_command("abc", "").contains('\n'));
    }

    #[test]
    fn non_root_users_read_through_sudo() {
        assert!(read_command("admin").starts_with("sudo cat"));
        assert!(read_command("root").starts_with("cat"));
    }
}
