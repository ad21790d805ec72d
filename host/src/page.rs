//! The status page at `/`: server-rendered HTML that refreshes itself, no frontend build. A
//! browser cannot send a bearer header on navigation, so the page signs in once with a token
//! kept in an HttpOnly, SameSite=Strict cookie; its buttons post forms that act through the
//! same dispatcher calls as the API. Every string shown is escaped by `maud`.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;

use crate::api::{parse_action, permits, unknown_action, ApiState, Need};
use crate::cost::Spend;
use crate::dispatcher::{ActionError, SchedulerQueue};
use crate::history::Sample;
use crate::pool::InstanceView;
use crate::scheduler::status::dollars;

const COOKIE: &str = "dispatch_cloud_token";
/// Seconds between the page's own reloads.
const REFRESH_SECONDS: u32 = 5;
/// Queue rows shown; the rest are counted.
const QUEUE_ROWS: usize = 200;

/// The page's routes, to merge with the API's (which has the fallback for unknown paths).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/ui/instances/{id}/{action}", post(act))
        .with_state(state)
}

/// The token the browser signed in with (hex in the cookie: any token survives the trip).
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .find_map(|hex_token| hex::decode(hex_token).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// A form post must come from this page: the cookie is SameSite=Strict already, and a
/// browser's `Origin` naming another site is refused too.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        == Some(host)
}

fn layout(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if refresh {
                    meta http-equiv="refresh" content=(REFRESH_SECONDS);
                }
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left}\
th{background:#f4f4f4}td:first-child{white-space:nowrap}.num{text-align:right}.money{font-size:1.3em;margin-right:2em}\
form.inline{display:inline}button{margin-right:.2em}.reason{color:#a40}\
.legend-instances{color:#1f6fb2}.legend-waiting{color:#d9731a}";

fn login_form(error: Option<&str>) -> Markup {
    layout(
        "dispatch-cloud: sign in",
        false,
        html! {
            h1 { "dispatch-cloud" }
            @if let Some(e) = error { p.reason { (e) } }
            form method="post" action="/login" {
                label { "Token " input type="password" name="token" autocomplete="current-password"; }
                " "
                button type="submit" { "Sign in" }
            }
        },
    )
}

async fn status_page(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let Some(token) = cookie_token(&headers) else {
        return Html(login_form(None).into_string()).into_response();
    };
    if let Err((_, why)) = permits(&state, &token, Need::Read) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_form(Some(why)).into_string()),
        )
            .into_response();
    }
    let may_manage = permits(&state, &token, Need::Manage).is_ok();
    let page = StatusPage {
        instances: state.dispatcher.instances(),
        queue: state.dispatcher.scheduler_queue(),
        spend: state.dispatcher.spend(),
        history: state.dispatcher.history(),
        now_ms: crate::queue::now_ms(),
        may_manage,
    };
    Html(page.render().into_string()).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-site form refused").into_response();
    }
    if let Err((status, why)) = permits(&state, form.token.trim(), Need::Read) {
        return (status, Html(login_form(Some(why)).into_string())).into_response();
    }
    // Behind a TLS-terminating proxy the cookie travels only over TLS.
    let behind_tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/{}",
        hex::encode(form.token.trim()),
        if behind_tls { "; Secure" } else { "" }
    );
    (
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
    )
        .into_response()
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
            ),
            (header::LOCATION, "/".into()),
        ],
    )
        .into_response()
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    reason: Option<String>,
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let page = layout(
        "dispatch-cloud: refused",
        false,
        html! {
            h1 { "Refused" }
            p.reason { (message) }
            p { a href="/" { "Back to the status page" } }
        },
    );
    (status, Html(page.into_string())).into_response()
}

/// A button on the page: hold, drain, run or kill one instance, then back to the page.
async fn act(
    State(state): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if !same_origin(&headers) {
        return error_page(StatusCode::FORBIDDEN, "cross-site form refused");
    }
    let token = cookie_token(&headers).unwrap_or_default();
    if let Err((status, why)) = permits(&state, &token, Need::Manage) {
        return error_page(status, why);
    }
    let reason = match form.reason.as_deref().map(str::trim) {
        Some(r) if !r.is_empty() => format!("{r} (from the status page)"),
        _ => "(from the status page)".to_string(),
    };
    let Some(request) = parse_action(&action, Some(reason)) else {
        return error_page(StatusCode::NOT_FOUND, &unknown_action(&action));
    };
    match state.dispatcher.act(&id, request).await {
        Ok(()) => (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response(),
        Err(e @ ActionError::NotFound(_)) => error_page(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ ActionError::ShuttingDown(_)) => error_page(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

struct StatusPage {
    instances: Vec<InstanceView>,
    queue: std::sync::Arc<SchedulerQueue>,
    spend: Spend,
    history: Vec<Sample>,
    now_ms: i64,
    may_manage: bool,
}

fn seconds_since(now_ms: i64, at_ms: i64) -> String {
    let s = (now_ms - at_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl StatusPage {
    fn waiting(&self) -> usize {
        self.queue.waiting
    }

    fn render(&self) -> Markup {
        layout(
            "dispatch-cloud",
            true,
            html! {
                h1 { "dispatch-cloud" }
                form.inline method="post" action="/logout" { button type="submit" { "Sign out" } }
                p {
                    span.money { "Now " strong #hourly-price data-value=(self.spend.hourly_price) { "$" (dollars(self.spend.hourly_price)) "/h" } }
                    span.money { "Today " strong #spent-today data-value=(self.spend.spent_today) { "$" (dollars(self.spend.spent_today)) } }
                    @if let Some(cap) = self.spend.max_hourly_spend {
                        span.money { "Cap " strong #spend-cap { "$" (dollars(cap)) "/h" } }
                    }
                }
                (self.chart())
                (self.fleet())
                (self.queue())
            },
        )
    }

    /// Instances and waiting containers over the last hour, as two lines of one SVG.
    fn chart(&self) -> Markup {
        const W: f64 = 600.0;
        const H: f64 = 120.0;
        let mut samples = self.history.clone();
        samples.push(Sample {
            at_ms: self.now_ms,
            instances: self.instances.len(),
            waiting: self.waiting(),
        });
        let top = samples
            .iter()
            .map(|s| s.instances.max(s.waiting))
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let start = self.now_ms - 3_600_000;
        let line = |value: &dyn Fn(&Sample) -> usize| {
            samples
                .iter()
                .map(|s| {
                    let x = (s.at_ms - start).max(0) as f64 / 3_600_000.0 * W;
                    let y = H - value(s) as f64 / top * (H - 4.0) - 2.0;
                    format!("{x:.1},{y:.1}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        html! {
            h2 { "Last hour" }
            p {
                span.legend-instances { "■ instances" } " "
                span.legend-waiting { "■ waiting containers" } " (top: " (top) ")"
            }
            svg #history width=(W) height=(H) viewBox={ "0 0 " (W) " " (H) } style="border:1px solid #ddd" {
                polyline fill="none" stroke="#1f6fb2" stroke-width="2" points=(line(&|s| s.instances)) {}
                polyline fill="none" stroke="#d9731a" stroke-width="2" points=(line(&|s| s.waiting)) {}
            }
        }
    }

    fn fleet(&self) -> Markup {
        let mut types: Vec<String> = self
            .instances
            .iter()
            .map(|i| {
                i.instance_type
                    .clone()
                    .unwrap_or_else(|| i.provider_type.clone())
            })
            .collect();
        types.sort();
        types.dedup();
        let states = [
            "creating", "unknown", "booting", "idle", "running", "shutdown",
        ];
        let count = |t: &str, state: &str| {
            self.instances
                .iter()
                .filter(|i| {
                    i.state.as_str() == state
                        && i.instance_type.as_deref().unwrap_or(&i.provider_type) == t
                })
                .count()
        };
        html! {
            h2 { "Fleet: " span #instance-count data-value=(self.instances.len()) { (self.instances.len()) } " instances" }
            table #fleet {
                tr { th { "type" } @for s in states { th.num { (s) } } }
                @for t in &types {
                    tr {
                        td { (t) }
                        @for s in states {
                            td.num data-type=(t) data-state=(s) { (count(t, s)) }
                        }
                    }
                }
            }
            table #instances {
                tr {
                    th { "instance" } th { "type" } th { "state" } th { "idle behaviour" }
                    th { "address" } th.num { "$/h" } th { "containers" } th { "reason" }
                    @if self.may_manage { th { "act" } }
                }
                @for i in &self.instances {
                    tr data-instance=(i.id) {
                        td { @if i.id.is_empty() { "(creating)" } @else { (i.id) } }
                        td { (i.instance_type.as_deref().unwrap_or("-")) }
                        td.state { (i.state.as_str()) }
                        td.idle-behavior { (i.idle_behavior.as_str()) }
                        td { (i.address) }
                        td.num { (dollars(i.price)) }
                        td { (i.containers.join(", ")) }
                        td.reason { (i.reason.as_deref().unwrap_or("")) }
                        @if self.may_manage && !i.id.is_empty() {
                            td { (actions(&i.id)) }
                        }
                    }
                }
            }
        }
    }

    fn queue(&self) -> Markup {
        let entries = &self.queue.entries;
        html! {
            h2 {
                "Queue: " span #queue-length data-value=(self.waiting()) { (self.waiting()) }
                " waiting, " (entries.len() - self.waiting()) " on VMs"
            }
            table #queue {
                tr {
                    th { "container" } th { "state" } th.num { "priority" } th.num { "waited" }
                    th { "eligible types" } th { "status" }
                }
                @for e in entries.iter().take(QUEUE_ROWS) {
                    tr data-container=(e.container) {
                        td { (e.container) }
                        td { (e.state.as_str()) }
                        td.num { (e.priority) }
                        td.num { (seconds_since(self.now_ms, e.first_seen_at_ms)) }
                        td { (e.instance_types.join(", ")) }
                        td.status { (e.scheduling_status) }
                    }
                }
            }
            @if entries.len() > QUEUE_ROWS {
                p { "… and " (entries.len() - QUEUE_ROWS) " more (ps --scheduling lists them all)" }
            }
        }
    }
}

/// `id` as one URL path segment: a cloud's instance ID is not ours to trust.
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The four buttons of one instance; kill asks for a reason.
fn actions(id: &str) -> Markup {
    let id = path_segment(id);
    html! {
        @for action in ["hold", "drain", "run"] {
            form.inline method="post" action={ "/ui/instances/" (id) "/" (action) } {
                button type="submit" data-action=(action) { (action) }
            }
        }
        form.inline method="post" action={ "/ui/instances/" (id) "/kill" } {
            input type="text" name="reason" placeholder="why kill" required size="12";
            button type="submit" data-action="kill" { "kill" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_carries_any_token_and_nothing_else() {
        let mut headers = HeaderMap::new();
        let token = "a token; with=odd chars";
        headers.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={}; x=y", hex::encode(token))
                .parse()
                .expect("header"),
        );
        assert_eq!(cookie_token(&headers).as_deref(), Some(token));
        headers.insert(
            header::COOKIE,
            format!("{COOKIE}=zz").parse().expect("header"),
        );
        assert_eq!(cookie_token(&headers), None);
    }

    #[test]
    fn instance_ids_are_one_path_segment() {
        assert_eq!(path_segment("i-0abc_1.2~"), "i-0abc_1.2~");
        assert_eq!(path_segment("../x y/?"), "..%2Fx%20y%2F%3F");
    }

    #[test]
    fn a_form_from_another_site_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:9006".parse().expect("host"));
        assert!(
            same_origin(&headers),
            "no Origin: not a browser's cross-site post"
        );
        headers.insert(
            header::ORIGIN,
            "http://127.0.0.1:9006".parse().expect("origin"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            "http://evil.example".parse().expect("origin"),
        );
        assert!(!same_origin(&headers));
    }

    #[test]
    fn what_a_vm_says_is_shown_escaped() {
        let hostile = "<script>alert(1)</script>";
        let page = StatusPage {
            instances: vec![InstanceView {
                id: "i-1".into(),
                instance_type: Some("small".into()),
                provider_type: "lb.small".into(),
                state: crate::pool::InstanceState::Idle,
                idle_behavior: crate::pool::IdleBehavior::Run,
                address: "127.0.0.1:1".into(),
                price: 0.25,
                containers: vec![],
                reason: Some(hostile.into()),
                last_container: None,
                last_busy_at_ms: 0,
                last_probe_ok_at_ms: None,
                event_stream: false,
            }],
            queue: Default::default(),
            spend: Spend {
                hourly_price: 0.25,
                spent_today: 1.0,
                max_hourly_spend: None,
            },
            history: vec![],
            now_ms: 0,
            may_manage: true,
        }
        .render()
        .into_string();
        assert!(!page.contains(hostile));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("data-action=\"drain\""));
    }
}
