//! A small Azure Resource Manager client: JSON over HTTPS with a bearer token from
//! `azure_identity`, long-running operations followed to their end, on the plugin's own runtime.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use reqwest::header::{HeaderMap, AUTHORIZATION, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::errors::ArmFailure;

/// One runtime for the plugin's whole life: never dropped, so no set is dropped inside some
/// other runtime's async context. The host's tokio is a different copy and cannot drive these
/// futures.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // reqwest is built without a TLS provider of its own (see Cargo.toml).
            let _ = rustls::crypto::ring::default_provider().install_default();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("azure-driver")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the driver's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs `f` to completion on the plugin's runtime.
pub fn block_on<T>(f: impl Future<Output = T>) -> Result<T, String> {
    Ok(runtime()?.block_on(f))
}

/// An answer from ARM that was not an error.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

pub struct Arm {
    http: reqwest::Client,
    credential: Arc<dyn TokenCredential>,
    /// `https://management.azure.com`, no trailing slash.
    pub endpoint: String,
    scope: String,
    request_timeout: Duration,
}

impl Arm {
    pub fn new(
        http: reqwest::Client,
        credential: Arc<dyn TokenCredential>,
        endpoint: &str,
        request_timeout: Duration,
    ) -> Arm {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        Arm {
            http,
            credential,
            scope: format!("{endpoint}/.default"),
            endpoint,
            request_timeout,
        }
    }

    /// A token for ARM (cached and refreshed by `azure_identity`).
    pub async fn token(&self) -> Result<String, ArmFailure> {
        self.credential
            .get_token(&[self.scope.as_str()], None)
            .await
            .map(|t| t.token.secret().to_string())
            .map_err(|e| ArmFailure::credential(&e))
    }

    /// `method` on `url` (a path below the endpoint, or a full URL ARM handed back) with
    /// `api-version` when given. Non-2xx answers are failures.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        api_version: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Reply, ArmFailure> {
        let full = if url.starts_with("https://") || url.starts_with("http://") {
            url.to_string()
        } else {
            format!("{}{url}", self.endpoint)
        };
        // URLs from ARM's own headers go to ARM only: the token must never leave for elsewhere.
        if !below(&self.endpoint, &full) {
            return Err(ArmFailure::local(format!(
                "refusing to follow {full}: not below the endpoint {}",
                self.endpoint
            )));
        }
        let token = self.token().await?;
        let mut request = self
            .http
            .request(method.clone(), &full)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .timeout(self.request_timeout);
        if let Some(v) = api_version {
            request = request.query(&[("api-version", v)]);
        }
        if let Some(b) = body {
            request = request.json(b);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ArmFailure::local(format!("{method} {}: {e}", path_of(&full))))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .map_err(|e| ArmFailure::local(format!("{method} {}: {e}", path_of(&full))))?;
        if !status.is_success() {
            return Err(ArmFailure::from_response(status.as_u16(), &headers, &text));
        }
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| {
                ArmFailure::local(format!("{method} {}: not JSON: {e}", path_of(&full)))
            })?
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Follows the long-running operation `reply` started (`Azure-AsyncOperation`, else
    /// `Location`, else the resource's `provisioningState`) until it ends or `limit` passes.
    pub async fn finish(
        &self,
        resource: &str,
        api_version: &str,
        reply: Reply,
        limit: Duration,
    ) -> Result<(), ArmFailure> {
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(200);
        let async_op = header(&reply.headers, "azure-asyncoperation");
        let location = header(&reply.headers, LOCATION.as_str());
        let mut hint = retry_after(&reply.headers);
        if async_op.is_none() && location.is_none() && provisioning_done(&reply.body)? {
            return Ok(());
        }
        loop {
            if Instant::now() >= deadline {
                return Err(ArmFailure::local(format!(
                    "{resource}: not finished after {limit:?} (operation_timeout_seconds)"
                )));
            }
            // ARM's Retry-After paces the polls (at least 1 s, at most 30 s); without one,
            // 0.2 s growing to 5 s.
            let wait = hint
                .map(|h| h.clamp(Duration::from_secs(1), Duration::from_secs(30)))
                .unwrap_or(pause);
            tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 3 / 2).min(Duration::from_secs(5));
            if let Some(url) = &async_op {
                let Some(status) =
                    transient_ok(self.send(Method::GET, url, None, None).await, &mut hint)?
                else {
                    continue;
                };
                hint = retry_after(&status.headers);
                match status.body.get("status").and_then(Value::as_str) {
                    Some("Succeeded") => return Ok(()),
                    Some("Failed" | "Canceled") => {
                        return Err(ArmFailure::from_body(status.status.as_u16(), &status.body))
                    }
                    _ => continue,
                }
            }
            if let Some(url) = &location {
                let Some(polled) =
                    transient_ok(self.send(Method::GET, url, None, None).await, &mut hint)?
                else {
                    continue;
                };
                hint = retry_after(&polled.headers);
                if polled.status == StatusCode::ACCEPTED {
                    continue;
                }
                return Ok(());
            }
            let Some(current) = transient_ok(
                self.send(Method::GET, resource, Some(api_version), None)
                    .await,
                &mut hint,
            )?
            else {
                continue;
            };
            if provisioning_done(&current.body)? {
                return Ok(());
            }
        }
    }
}

/// A poll that failed for a reason that passes (throttled, a server error, no answer) is
/// `Ok(None)`: the operation is still going, ask again. Anything else ends the wait.
fn transient_ok(
    polled: Result<Reply, ArmFailure>,
    hint: &mut Option<Duration>,
) -> Result<Option<Reply>, ArmFailure> {
    match polled {
        Ok(reply) => Ok(Some(reply)),
        Err(f) if f.http_status.is_none_or(|s| s == 429 || s >= 500) => {
            log::debug!("polling an operation: {f}; asking again");
            *hint = f.retry_after;
            Ok(None)
        }
        Err(f) => Err(f),
    }
}

/// Whether `url` lies below `endpoint`: same scheme, host and port (443 written or not), and
/// a path under the endpoint's. A prefix test of the text would pass
/// `https://management.azure.com.evil.net/` and `https://management.azure.com@evil.net/`.
pub fn below(endpoint: &str, url: &str) -> bool {
    let (Ok(base), Ok(target)) = (reqwest::Url::parse(endpoint), reqwest::Url::parse(url)) else {
        return false;
    };
    let base_path = base.path().trim_end_matches('/');
    let path_ok = target.path() == base_path || target.path().starts_with(&format!("{base_path}/"));
    base.scheme() == target.scheme()
        && base.host_str() == target.host_str()
        && base.port_or_known_default() == target.port_or_known_default()
        && target.username().is_empty()
        && target.password().is_none()
        && path_ok
}

/// Whether a resource body's `provisioningState` is final (`Err` when it failed).
fn provisioning_done(body: &Value) -> Result<bool, ArmFailure> {
    match body
        .pointer("/properties/provisioningState")
        .and_then(Value::as_str)
    {
        None | Some("Succeeded") => Ok(true),
        Some(state @ ("Failed" | "Canceled")) => Err(ArmFailure::local(format!(
            "provisioning {}",
            state.to_lowercase()
        ))),
        Some(_) => Ok(false),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A `Retry-After` of seconds or an HTTP date, as a wait from now.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(LONGEST_RETRY_AFTER));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(LONGEST_RETRY_AFTER),
    )
}

/// No server gets to park us for more than an hour.
pub const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The path of a URL, for messages (query strings can carry tokens in other APIs).
fn path_of(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_urls_below_the_endpoint_get_the_token() {
        let e = "https://management.azure.com";
        assert!(below(
            e,
            "https://management.azure.com/subscriptions/s?api-version=1"
        ));
        assert!(below(
            e,
            "https://management.azure.com:443/subscriptions/s/operations/x"
        ));
        for foreign in [
            "https://management.azure.com.evil.net/subscriptions/s",
            "https://management.azure.com@evil.net/subscriptions/s",
            "https://user:pw@management.azure.com/subscriptions/s",
            "http://management.azure.com/subscriptions/s",
            "https://management.azure.com:8443/subscriptions/s",
            "https://evil.net/https://management.azure.com/",
            "not a url",
        ] {
            assert!(!below(e, foreign), "{foreign}");
        }
        assert!(below(
            "https://127.0.0.1:8443/arm",
            "https://127.0.0.1:8443/arm/subscriptions"
        ));
        assert!(!below(
            "https://127.0.0.1:8443/arm",
            "https://127.0.0.1:8443/armory"
        ));
    }

    #[test]
    fn retry_after_is_capped() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "18446744073709551615".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(LONGEST_RETRY_AFTER));
    }
}
