//! Azure's vCPU quota families, from VM size names.

/// The quota family of a VM size, as Azure's usage API names it: `Standard_D4s_v5` →
/// `standardDSv5Family`, `Standard_DS2_v2` → `standardDSv2Family`, `Standard_B2s` →
/// `standardBSFamily`, `Standard_E4-2ds_v5` → `standardEDSv5Family`. Sizes Azure groups
/// differently can be mapped with the `quota_groups` parameter.
pub fn vm_family(size: &str) -> String {
    let body = size
        .strip_prefix("Standard_")
        .or_else(|| size.strip_prefix("Basic_"))
        .unwrap_or(size);
    let (name, version) = match body.split_once("_v") {
        Some((n, v)) => (n, Some(v.split('_').next().unwrap_or(v))),
        None => (body.split('_').next().unwrap_or(body), None),
    };
    // Series letters, then the vCPU count (with `-` for constrained sizes), then feature
    // letters (a: AMD, d: local disk, s: premium storage, …).
    let series: String = name
        .chars()
        .take_while(|c| c.is_ascii_uppercase())
        .collect();
    let features: String = name
        .chars()
        .skip(series.len())
        .skip_while(|c| c.is_ascii_digit() || *c == '-')
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_uppercase();
    let version = version.map(|v| format!("v{v}")).unwrap_or_default();
    format!("standard{series}{features}{version}Family")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_as_azure_names_them() {
        for (size, family) in [
            ("Standard_D4s_v5", "standardDSv5Family"),
            ("Standard_D4ds_v5", "standardDDSv5Family"),
            ("Standard_D4ads_v5", "standardDADSv5Family"),
            ("Standard_D2_v5", "standardDv5Family"),
            ("Standard_DS2_v2", "standardDSv2Family"),
            ("Standard_E8s_v3", "standardESv3Family"),
            ("Standard_E4-2ds_v5", "standardEDSv5Family"),
            ("Standard_F4s_v2", "standardFSv2Family"),
            ("Standard_B2s", "standardBSFamily"),
            ("Standard_NC6s_v3", "standardNCSv3Family"),
            ("Standard_NV36ads_A10_v5", "standardNVADSA10v5Family"),
        ] {
            assert_eq!(vm_family(size), family, "{size}");
        }
    }
}
