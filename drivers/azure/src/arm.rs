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
        if !full.starts_with(&self.endpoint) {
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
            // ARM's Retry-After paces the polls; without one, 0.2 s growing to 5 s.
            let wait = hint.unwrap_or(pause).min(Duration::from_secs(30));
            tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 3 / 2).min(Duration::from_secs(5));
            if let Some(url) = &async_op {
                let status = self.send(Method::GET, url, None, None).await?;
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
                let polled = self.send(Method::GET, url, None, None).await?;
                hint = retry_after(&polled.headers);
                if polled.status == StatusCode::ACCEPTED {
                    continue;
                }
                return Ok(());
            }
            let current = self
                .send(Method::GET, resource, Some(api_version), None)
                .await?;
            if provisioning_done(&current.body)? {
                return Ok(());
            }
        }
    }
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
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The path of a URL, for messages (query strings can carry tokens in other APIs).
fn path_of(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}
