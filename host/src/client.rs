//! The CLI's side of the HTTP API.

use std::io::Read;

use anyhow::{anyhow, Context};

use crate::pool::InstanceView;
use crate::queue::{Container, NewContainer};

pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(url: &str, token: &str) -> Self {
        Client {
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            // No idle-connection pool: a connection the server closed between two commands
            // would fail the next (non-retried) POST with an unexpected EOF. A fresh
            // connection per call costs little next to a CLI's process start.
            agent: ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(30))
                .max_idle_connections(0)
                .build(),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<ureq::Response> {
        let url = format!("{}{path}", self.base);
        let request = self
            .agent
            .request(method, &url)
            .set("Authorization", &format!("Bearer {}", self.token));
        let result = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match result {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(String::from))
                    .unwrap_or(text);
                Err(anyhow!("{method} {url}: HTTP {code}: {message}"))
            }
            Err(e) => Err(anyhow!(
                "{method} {url}: {e} (is `dispatch-cloud serve` running?)"
            )),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        self.call(method, path, body)?
            .into_json()
            .with_context(|| format!("{method} {path}: bad response"))
    }

    pub fn submit(&self, new: &NewContainer) -> anyhow::Result<Container> {
        self.json("POST", "/containers", Some(serde_json::to_value(new)?))
    }

    pub fn list(&self) -> anyhow::Result<Vec<Container>> {
        self.json("GET", "/containers", None)
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Container> {
        self.json("GET", &format!("/containers/{id}"), None)
    }

    pub fn cancel(&self, id: &str) -> anyhow::Result<Container> {
        self.json("POST", &format!("/containers/{id}/cancel"), None)
    }

    pub fn set_priority(&self, id: &str, priority: i64) -> anyhow::Result<Container> {
        self.json(
            "POST",
            &format!("/containers/{id}/priority"),
            Some(serde_json::json!({ "priority": priority })),
        )
    }

    pub fn logs(&self, id: &str, stream: &str) -> anyhow::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.call("GET", &format!("/containers/{id}/logs/{stream}"), None)?
            .into_reader()
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    pub fn instances(&self) -> anyhow::Result<Vec<InstanceView>> {
        self.json("GET", "/instances", None)
    }
}
