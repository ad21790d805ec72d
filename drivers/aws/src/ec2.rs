//! A small EC2 Query API client: form-encoded POSTs signed with SigV4, XML responses.

use std::time::{Duration, SystemTime};

use crate::credentials::CredentialSource;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use serde::Deserialize;

/// The EC2 API version this client speaks.
pub const API_VERSION: &str = "2016-11-15";

/// An error answer from EC2 (or a transport failure, with an empty code).
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    pub http_status: u16,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

#[derive(Deserialize)]
struct ErrorResponse {
    #[serde(rename = "Errors")]
    errors: ErrorList,
}

#[derive(Deserialize)]
struct ErrorList {
    #[serde(rename = "Error", default)]
    error: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(rename = "Code")]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

/// Reads an EC2 error body (`<Response><Errors><Error><Code>…`).
pub fn parse_error(status: u16, body: &str) -> ApiError {
    match quick_xml::de::from_str::<ErrorResponse>(body) {
        Ok(r) if !r.errors.error.is_empty() => {
            let e = &r.errors.error[0];
            ApiError {
                code: e.code.clone(),
                message: e.message.clone(),
                http_status: status,
            }
        }
        _ => ApiError {
            code: String::new(),
            message: format!(
                "HTTP {status}: {}",
                body.chars().take(300).collect::<String>()
            ),
            http_status: status,
        },
    }
}

pub struct Ec2Client {
    endpoint: String,
    region: String,
    credentials: CredentialSource,
    http: reqwest::blocking::Client,
}

fn encode(s: &str) -> String {
    // RFC 3986 unreserved characters stay; everything else is percent-encoded, as SigV4 expects.
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Ec2Client {
    pub fn new(
        endpoint: &str,
        region: &str,
        credentials: CredentialSource,
        timeout: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Ec2Client {
            endpoint: endpoint.to_string(),
            region: region.to_string(),
            credentials,
            http,
        })
    }

    /// Calls `action` with `params`; returns the response body.
    pub fn call(&self, action: &str, params: &[(String, String)]) -> Result<String, ApiError> {
        let transport = |message: String| ApiError {
            code: String::new(),
            message,
            http_status: 0,
        };
        let mut body = format!("Action={}&Version={API_VERSION}", encode(action));
        for (k, v) in params {
            body.push('&');
            body.push_str(&encode(k));
            body.push('=');
            body.push_str(&encode(v));
        }
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let identity = self
            .credentials
            .current()
            .map_err(|e| transport(format!("credentials: {e}")))?
            .into();
        let signing_params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| transport(format!("signing: {e}")))?
            .into();
        let headers = [("content-type", content_type)];
        let signable = SignableRequest::new(
            "POST",
            self.endpoint.as_str(),
            headers.iter().copied(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| transport(format!("signing: {e}")))?;
        let (instructions, _) = sign(signable, &signing_params)
            .map_err(|e| transport(format!("signing: {e}")))?
            .into_parts();
        let mut request = self
            .http
            .post(&self.endpoint)
            .header("content-type", content_type)
            .body(body);
        for (name, value) in instructions.headers() {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .map_err(|e| transport(format!("{action} to {}: {e}", self.endpoint)))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .map_err(|e| transport(format!("{action}: reading the response: {e}")))?;
        if (200..300).contains(&status) {
            Ok(text)
        } else {
            Err(parse_error(status, &text))
        }
    }
}

/// `<xxxSet><item>…</item></xxxSet>`.
#[derive(Debug, Deserialize)]
pub struct Items<T> {
    #[serde(rename = "item", default = "Vec::new")]
    pub item: Vec<T>,
}

impl<T> Default for Items<T> {
    fn default() -> Self {
        Items { item: Vec::new() }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct TagItem {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Deserialize)]
pub struct InstanceState {
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct Placement {
    #[serde(rename = "availabilityZone", default)]
    pub availability_zone: String,
}

#[derive(Debug, Deserialize)]
pub struct InstanceItem {
    #[serde(rename = "instanceId")]
    pub instance_id: String,
    #[serde(rename = "instanceType", default)]
    pub instance_type: String,
    #[serde(rename = "privateIpAddress", default)]
    pub private_ip: Option<String>,
    #[serde(rename = "instanceState")]
    pub state: Option<InstanceState>,
    #[serde(rename = "instanceLifecycle", default)]
    pub lifecycle: Option<String>,
    #[serde(rename = "tagSet", default)]
    pub tags: Items<TagItem>,
    pub placement: Option<Placement>,
}

#[derive(Debug, Deserialize)]
pub struct Reservation {
    #[serde(rename = "instancesSet", default)]
    pub instances: Items<InstanceItem>,
}

#[derive(Debug, Deserialize)]
pub struct DescribeInstancesResponse {
    #[serde(rename = "reservationSet", default)]
    pub reservations: Items<Reservation>,
    #[serde(rename = "nextToken", default)]
    pub next_token: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RunInstancesResponse {
    #[serde(rename = "instancesSet", default)]
    pub instances: Items<InstanceItem>,
}

#[derive(Debug, Deserialize)]
pub struct KeyPairItem {
    #[serde(rename = "keyName")]
    pub name: String,
    #[serde(rename = "keyFingerprint", default)]
    pub fingerprint: String,
}

#[derive(Debug, Deserialize)]
pub struct DescribeKeyPairsResponse {
    #[serde(rename = "keySet", default)]
    pub keys: Items<KeyPairItem>,
}

#[derive(Debug, Deserialize)]
pub struct SpotPriceItem {
    #[serde(rename = "instanceType")]
    pub instance_type: String,
    #[serde(rename = "availabilityZone", default)]
    pub availability_zone: String,
    #[serde(rename = "spotPrice")]
    pub spot_price: String,
    pub timestamp: String,
}

#[derive(Debug, Deserialize)]
pub struct DescribeSpotPriceHistoryResponse {
    #[serde(rename = "spotPriceHistorySet", default)]
    pub prices: Items<SpotPriceItem>,
    #[serde(rename = "nextToken", default)]
    pub next_token: Option<String>,
}

pub fn parse<T: serde::de::DeserializeOwned>(action: &str, body: &str) -> Result<T, ApiError> {
    quick_xml::de::from_str(body).map_err(|e| ApiError {
        code: String::new(),
        message: format!("{action}: unexpected response: {e}"),
        http_status: 200,
    })
}
