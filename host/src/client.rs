//! The CLI's side of the HTTP API.

use std::io::Read;

use anyhow::{anyhow, Context};

use crate::pool::InstanceView;
use crate::queue::{Container, NewContainer};

/// Containers per request when `list` walks the pages.
const LIST_PAGE: usize = 1000;

/// One page of `GET /containers`.
pub struct Page {
    pub containers: Vec<Container>,
    /// The cursor of the next page; `None` on the last.
    pub next: Option<i64>,
}

/// The `before` cursor in a `Link: <…&before=N>; rel="next"` header.
fn next_cursor(link: &str) -> Option<i64> {
    if !link.contains("rel=\"next\"") {
        return None;
    }
    let url = link.split_once('<')?.1.split_once('>')?.0;
    url.split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("before="))
        .and_then(|v| v.parse().ok())
}

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

    /// Many containers in one request: all are queued, or none.
    pub fn submit_many(&self, batch: &[NewContainer]) -> anyhow::Result<Vec<Container>> {
        self.json("POST", "/containers", Some(serde_json::to_value(batch)?))
    }

    /// The containers not yet final (Queued, Locked, Running), oldest first.
    pub fn active(&self) -> anyhow::Result<Vec<Container>> {
        self.json("GET", "/containers?active=true", None)
    }

    /// Every container, newest first, fetched a page at a time.
    pub fn list(&self) -> anyhow::Result<Vec<Container>> {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = self.list_page(LIST_PAGE, before)?;
            all.extend(page.containers);
            match page.next {
                Some(next) => before = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// One page of at most `limit` containers older than the cursor `before`, newest first.
    pub fn list_page(&self, limit: usize, before: Option<i64>) -> anyhow::Result<Page> {
        let mut path = format!("/containers?limit={limit}");
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        let response = self.call("GET", &path, None)?;
        let next = response.header("link").and_then(next_cursor);
        let containers = response
            .into_json()
            .with_context(|| format!("GET {path}: bad response"))?;
        Ok(Page { containers, next })
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

    /// The scheduler's queue in the order it serves containers, with why each waits.
    pub fn scheduler_queue(&self) -> anyhow::Result<Vec<crate::scheduler::QueueEntry>> {
        self.json("GET", "/scheduler/queue", None)
    }

    pub fn instances(&self) -> anyhow::Result<Vec<InstanceView>> {
        self.json("GET", "/instances", None)
    }

    /// `hold`, `drain`, `run` or `kill` (with a reason) one instance.
    pub fn instance_action(
        &self,
        id: &str,
        action: &str,
        reason: Option<&str>,
    ) -> anyhow::Result<()> {
        let body = reason.map(|r| serde_json::json!({ "reason": r }));
        self.call("POST", &format!("/instances/{id}/{action}"), body)
            .map(|_| ())
    }
}
