//! Where the host's tags live on a GCE instance, and the naming rules GCE imposes.
//!
//! Tags are metadata items (any value, keys of `[A-Za-z0-9_-]`), one per tag, under a prefix
//! that keeps them apart from the items the driver writes itself (`startup-script`, `ssh-keys`).
//! Labels would be filterable, but their values only allow lowercase letters, digits, `-` and
//! `_`, so only the set ID (which fits) is a label as well.

use driver_abi::Tags;

/// Prefix of the metadata items holding tags.
pub const TAG_PREFIX: &str = "dc-tag-";

/// The metadata key of tag `key`: bytes outside `[A-Za-z0-9-]` become `_XX` (hex), so any tag
/// key round-trips.
pub fn metadata_key(key: &str) -> String {
    let mut out = String::from(TAG_PREFIX);
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// The tag key a metadata key holds, or `None` for items that are not tags (or not ours).
pub fn tag_key(metadata_key: &str) -> Option<String> {
    let encoded = metadata_key.strip_prefix(TAG_PREFIX)?;
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = encoded.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The tags among metadata `items` (key, value).
pub fn from_items<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> Tags {
    items
        .into_iter()
        .filter_map(|(k, v)| Some((tag_key(k)?, v.to_string())))
        .collect()
}

/// Checks a GCE label key or value: at most 63 of lowercase letters, digits, `-`, `_`
/// (international letters too, which this driver does not need); keys start with a letter.
pub fn check_label(what: &str, text: &str, is_key: bool) -> Result<(), String> {
    let allowed = text
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    let starts_ok = !is_key || text.starts_with(|c: char| c.is_ascii_lowercase());
    if text.len() > 63 || !allowed || !starts_ok {
        return Err(format!(
            "{what} {text:?}: GCE labels allow at most 63 lowercase letters, digits, '-' and '_'{}",
            if is_key {
                ", starting with a letter"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_tag_key_round_trips_through_a_valid_metadata_key() {
        for key in [
            "dispatch-cloud-instance-type",
            "Owner",
            "with space",
            "dotted.key/slash",
            "under_score",
            "ünïcode",
            "",
        ] {
            let m = metadata_key(key);
            assert!(
                m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{m}"
            );
            assert_eq!(tag_key(&m).as_deref(), Some(key), "{m}");
        }
        assert_eq!(tag_key("startup-script"), None);
        assert_eq!(tag_key("dc-tag-bad_Z"), None, "broken escapes are not tags");
    }

    #[test]
    fn labels_follow_gce_rules() {
        assert!(check_label("label", "zzzzz-zzzzz-0123456789abcde", false).is_ok());
        assert!(check_label("label key", "team_a", true).is_ok());
        assert!(check_label("label key", "9lives", true).is_err());
        assert!(check_label("label", "Upper", false).is_err());
        assert!(check_label("label", &"a".repeat(64), false).is_err());
    }
}
