//! Where the EC2 client's credentials come from: keys given (parameters or environment), or,
//! with none, short-lived keys refreshed before they expire: a role assumed with a
//! web-identity token file (STS `AssumeRoleWithWebIdentity`, as on EKS), or the instance role
//! through IMDSv2. No long-lived key needs to sit on the host's disk.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use serde::Deserialize;

use crate::time::parse_rfc3339;

/// Role credentials are fetched again when this little of their life is left.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// IMDS answers on the link-local address of every EC2 instance.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// IMDS is local: an answer slower than this means there is none.
const IMDS_TIMEOUT: Duration = Duration::from_secs(2);
/// The session token's life asked for (the longest IMDSv2 allows).
const TOKEN_TTL_SECONDS: &str = "21600";

pub enum CredentialSource {
    Static(Credentials),
    Refreshed(Refreshing),
}

impl CredentialSource {
    /// Credentials to sign with now.
    pub fn current(&self) -> Result<Credentials, String> {
        match self {
            CredentialSource::Static(c) => Ok(c.clone()),
            CredentialSource::Refreshed(r) => r.current(),
        }
    }
}

/// Something that hands out keys with an expiry: IMDS, or STS with a web-identity token.
pub trait Fetch: Send + Sync {
    fn fetch(&self) -> Result<(Credentials, SystemTime), String>;
}

/// Short-lived keys, kept while fresh and fetched again before they expire.
pub struct Refreshing {
    source: Box<dyn Fetch>,
    cached: Mutex<Option<(Credentials, SystemTime)>>,
    /// After a refresh that failed while the old keys still worked: not before this.
    next_try: Mutex<Option<SystemTime>>,
}

/// The instance metadata service, IMDSv2 (a session token first, then the role's keys).
pub struct Imds {
    endpoint: String,
    http: reqwest::blocking::Client,
}

/// How long to keep signing with still-valid keys after IMDS failed to refresh them, before
/// asking it again.
const RETRY_AFTER_FAILED_REFRESH: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoleCredentials {
    code: String,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    token: Option<String>,
    expiration: Option<String>,
    message: Option<String>,
}

impl Imds {
    /// Only plain HTTP to IMDS's link-local address, or to a loopback one (a test's fake):
    /// whatever answers gets to hand us keys.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(endpoint)
            .map_err(|e| format!("imds_endpoint: {endpoint:?} is not a URL: {e}"))?;
        if url.scheme() != "http" {
            return Err("imds_endpoint: must be http:// (IMDS speaks plain HTTP)".into());
        }
        if !url.username().is_empty() || url.password().is_some() || url.path() != "/" {
            return Err(format!(
                "imds_endpoint: {endpoint} must be a bare http://HOST[:PORT], no user or path"
            ));
        }
        let allowed = match url.host() {
            Some(url::Host::Ipv4(ip)) => {
                ip == std::net::Ipv4Addr::new(169, 254, 169, 254) || ip.is_loopback()
            }
            Some(url::Host::Ipv6(ip)) => {
                ip == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                    || ip.is_loopback()
            }
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        if !allowed {
            return Err(format!(
                "imds_endpoint: {endpoint} is neither IMDS (169.254.169.254, [fd00:ec2::254]) nor a loopback address"
            ));
        }
        let http = reqwest::blocking::Client::builder()
            .timeout(IMDS_TIMEOUT)
            // A proxy from the environment must not see the keys, nor a redirect send us on.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("IMDS client: {e}"))?;
        Ok(Imds {
            endpoint: url.as_str().trim_end_matches('/').to_string(),
            http,
        })
    }
}

impl Refreshing {
    pub fn new(source: impl Fetch + 'static) -> Self {
        Refreshing {
            source: Box::new(source),
            cached: Mutex::new(None),
            next_try: Mutex::new(None),
        }
    }

    fn current(&self) -> Result<Credentials, String> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let mut next_try = self.next_try.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((creds, expires)) = cached.as_ref() {
            let fresh = expires
                .duration_since(now)
                .is_ok_and(|left| left > REFRESH_BEFORE_EXPIRY);
            let holding_off = *expires > now && next_try.is_some_and(|t| now < t);
            if fresh || holding_off {
                return Ok(creds.clone());
            }
        }
        match self.source.fetch() {
            Ok((creds, expires)) => {
                log::info!("Role credentials refreshed; they expire at {expires:?}");
                *cached = Some((creds.clone(), expires));
                *next_try = None;
                Ok(creds)
            }
            // Keys that have not expired yet still sign; the next call tries IMDS again.
            Err(e) => match cached.as_ref() {
                Some((creds, expires)) if *expires > now => {
                    log::warn!("Refreshing role credentials failed ({e}); using the current ones, asking again in {RETRY_AFTER_FAILED_REFRESH:?}");
                    *next_try = Some(now + RETRY_AFTER_FAILED_REFRESH);
                    Ok(creds.clone())
                }
                _ => Err(e),
            },
        }
    }
}

impl Fetch for Imds {
    fn fetch(&self) -> Result<(Credentials, SystemTime), String> {
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("IMDS {what}: {e}");
        let token = self
            .http
            .put(format!("{}/latest/api/token", self.endpoint))
            .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.text())
            .map_err(|e| fail("session token", &e))?;
        let get = |path: &str| {
            self.http
                .get(format!(
                    "{}/latest/meta-data/iam/security-credentials/{path}",
                    self.endpoint
                ))
                .header("X-aws-ec2-metadata-token", token.trim())
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.text())
        };
        let roles = get("").map_err(|e| fail("role (is an instance profile attached?)", &e))?;
        let role = roles
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or("IMDS: no instance role (attach an instance profile)")?;
        if role.contains('/') || role.contains("..") {
            return Err(format!("IMDS: odd role name {role:?}"));
        }
        let body = get(role).map_err(|e| fail("role credentials", &e))?;
        let r: RoleCredentials =
            serde_json::from_str(&body).map_err(|e| fail("role credentials", &e))?;
        if r.code != "Success" {
            return Err(format!(
                "IMDS role credentials: {} {}",
                r.code,
                r.message.unwrap_or_default()
            ));
        }
        let (Some(key), Some(secret), Some(expiration)) =
            (r.access_key_id, r.secret_access_key, r.expiration)
        else {
            return Err("IMDS role credentials: keys or expiration missing".into());
        };
        let expires = parse_rfc3339(&expiration)
            .ok_or_else(|| format!("IMDS role credentials: expiration {expiration:?}"))?;
        Ok((
            Credentials::new(
                key,
                secret,
                r.token.filter(|t| !t.is_empty()),
                Some(expires),
                "imds",
            ),
            expires,
        ))
    }
}

/// A role assumed with a web-identity token (STS `AssumeRoleWithWebIdentity`). The token file
/// is read again at each refresh: whoever issues it (Kubernetes) rotates it.
pub struct WebIdentity {
    pub sts_endpoint: String,
    pub role_arn: String,
    pub token_file: std::path::PathBuf,
    pub session_name: String,
    http: reqwest::blocking::Client,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleResponse {
    assume_role_with_web_identity_result: AssumeRoleResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleResult {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

/// STS's error body (`<ErrorResponse><Error><Code>…`), unlike EC2's.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsErrorResponse {
    error: StsError,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsError {
    code: String,
    #[serde(default)]
    message: String,
}

impl WebIdentity {
    pub fn new(
        sts_endpoint: &str,
        role_arn: &str,
        token_file: &std::path::Path,
        timeout: Duration,
    ) -> Result<Self, String> {
        // The token goes with the request: only to HTTPS, or to a loopback test server.
        let url = reqwest::Url::parse(sts_endpoint)
            .map_err(|e| format!("sts_endpoint: {sts_endpoint:?} is not a URL: {e}"))?;
        let loopback = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(format!(
                "sts_endpoint: {sts_endpoint} must be https:// (http:// only to a loopback address)"
            ));
        }
        if role_arn.trim().is_empty() {
            return Err("role_arn: must be given with web_identity_token_file".into());
        }
        let http = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("STS client: {e}"))?;
        Ok(WebIdentity {
            sts_endpoint: url.to_string(),
            role_arn: role_arn.to_string(),
            token_file: token_file.to_path_buf(),
            session_name: "dispatch-cloud".into(),
            http,
        })
    }
}

impl Fetch for WebIdentity {
    fn fetch(&self) -> Result<(Credentials, SystemTime), String> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("web_identity_token_file {}: {e}", self.token_file.display()))?;
        let form = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", self.role_arn.as_str()),
            ("RoleSessionName", self.session_name.as_str()),
            ("WebIdentityToken", token.trim()),
            ("DurationSeconds", "3600"),
        ];
        let response = self
            .http
            .post(&self.sts_endpoint)
            .form(&form)
            .send()
            .map_err(|e| format!("STS AssumeRoleWithWebIdentity: {e}"))?;
        let status = response.status();
        let body = response
            .text()
            .map_err(|e| format!("STS AssumeRoleWithWebIdentity: {e}"))?;
        if !status.is_success() {
            let (code, message) = quick_xml::de::from_str::<StsErrorResponse>(&body)
                .map(|r| (r.error.code, r.error.message))
                .unwrap_or_else(|_| (format!("HTTP {status}"), body.chars().take(300).collect()));
            return Err(format!(
                "STS AssumeRoleWithWebIdentity for {}: {code} {message}",
                self.role_arn
            ));
        }
        let parsed: AssumeRoleResponse = quick_xml::de::from_str(&body)
            .map_err(|e| format!("STS AssumeRoleWithWebIdentity answer: {e}"))?;
        let c = parsed.assume_role_with_web_identity_result.credentials;
        let expires = parse_rfc3339(&c.expiration)
            .ok_or_else(|| format!("STS credentials: expiration {:?}", c.expiration))?;
        Ok((
            Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                Some(c.session_token).filter(|t| !t.is_empty()),
                Some(expires),
                "web-identity",
            ),
            expires,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_imds_or_loopback_gets_to_hand_out_keys() {
        for ok in [
            "http://169.254.169.254",
            "http://169.254.169.254/",
            "http://127.0.0.1:8080",
            "http://localhost:9",
            "http://[fd00:ec2::254]",
            "http://[::1]:8080",
        ] {
            assert!(Imds::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://169.254.169.254",
            "http://evil.example",
            "http://10.0.0.1:80",
            "169.254.169.254",
            "http://169.254.169.254:1@evil.example",
            "http://user@127.0.0.1:80",
            "http://127.0.0.1:80/latest",
        ] {
            assert!(Imds::new(bad).is_err(), "{bad}");
        }
    }
}
