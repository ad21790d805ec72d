//! The HTTP API (JSON over HTTP, bearer-token auth): containers and instances. Only this module
//! knows HTTP; the CLI talks to it through `client`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::dispatcher::{ActionError, DispatcherHandle, InstanceAction, SchedulerQueue};
use crate::queue::{NewContainer, Queue, QueueError};
use crate::scheduler::QueueEntry;

#[derive(Clone)]
pub struct ApiState {
    pub queue: Arc<dyn Queue>,
    pub dispatcher: DispatcherHandle,
    pub tokens: Arc<Vec<String>>,
    /// Tokens of the management endpoints; empty: `tokens` manage too.
    pub management_tokens: Arc<Vec<String>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What `/_health/ping` checks.
    pub runner: crate::pool::probe::RunnerBinary,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// Read the queue and the fleet: any token.
    Read,
    /// Submit or change containers: an API token.
    Submit,
    /// Act on instances: a management token (an API token when none are configured).
    Manage,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        let status = match &e {
            QueueError::NotFound(_) => StatusCode::NOT_FOUND,
            QueueError::Conflict { .. } => StatusCode::CONFLICT,
            QueueError::Invalid(_) => StatusCode::BAD_REQUEST,
            QueueError::Database { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// Axum's extractors, with their rejections (bad JSON, a wrong content type, a bad query or
/// path) answered as `{"error": …}` like every other refusal.
struct JsonBody<T>(T);
struct QueryArgs<T>(T);
struct PathArg<T>(T);

impl<S: Send + Sync, T> FromRequest<S> for JsonBody<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(r) => Err(ApiError(r.status(), r.body_text())),
        }
    }
}

impl<S: Send + Sync, T> FromRequestParts<S> for QueryArgs<T>
where
    axum::extract::Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(QueryArgs(v)),
            Err(r) => Err(ApiError(r.status(), r.body_text())),
        }
    }
}

impl<S: Send + Sync, T> FromRequestParts<S> for PathArg<T>
where
    axum::extract::Path<T>: FromRequestParts<S, Rejection = PathRejection>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathArg(v)),
            Err(r) => Err(ApiError(r.status(), r.body_text())),
        }
    }
}

/// Whether `presented` is one of `tokens`, in time that does not depend on how much of it
/// matches (a timing side channel would let a client guess a token byte by byte).
pub fn token_matches(tokens: &[String], presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    // No header is no token, whatever a config lists.
    if presented.is_empty() {
        return false;
    }
    tokens
        .iter()
        .fold(subtle::Choice::from(0), |found, t| {
            found | t.as_bytes().ct_eq(presented.as_bytes())
        })
        .into()
}

/// Whether the token `presented` may do what `need` asks: 401 when it is no known token,
/// 403 when it may not do that.
pub(crate) fn permits(
    state: &ApiState,
    presented: &str,
    need: Need,
) -> Result<(), (StatusCode, &'static str)> {
    let api = token_matches(&state.tokens, presented);
    let management = token_matches(&state.management_tokens, presented);
    if !api && !management {
        return Err((StatusCode::UNAUTHORIZED, "missing or wrong bearer token"));
    }
    let allowed = match need {
        Need::Read => true,
        Need::Submit => api,
        Need::Manage => management || (api && state.management_tokens.is_empty()),
    };
    if allowed {
        return Ok(());
    }
    let why = match need {
        Need::Manage => "this endpoint needs a management token (management_tokens)",
        _ => "a management token cannot submit or change containers",
    };
    Err((StatusCode::FORBIDDEN, why))
}

/// 401 without a known token, 403 with one that may not do what the route needs.
fn authorize(state: &ApiState, request: &Request, need: Need) -> Result<(), ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    permits(state, presented, need).map_err(|(status, why)| ApiError(status, why.into()))
}

async fn require(
    State((state, need)): State<(ApiState, Need)>,
    request: Request,
    next: Next,
) -> Response {
    match authorize(&state, &request, need) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

pub fn router(state: ApiState) -> Router {
    let guard = |need: Need| middleware::from_fn_with_state((state.clone(), need), require);
    let read = Router::new()
        .route("/containers", get(list))
        .route("/containers/{id}", get(get_one))
        .route("/containers/{id}/logs/{stream}", get(logs))
        .route("/instances", get(instances))
        .route("/scheduler/queue", get(scheduler_queue))
        .route("/costs", get(costs))
        .route("/scheduler/queue/{id}", get(scheduler_entry))
        .route("/metrics", get(metrics))
        .route_layer(guard(Need::Read));
    let submit = Router::new()
        .route("/containers", post(submit))
        .route("/containers/{id}/cancel", post(cancel))
        .route("/containers/{id}/priority", post(set_priority))
        .route_layer(guard(Need::Submit));
    let manage = Router::new()
        .route("/instances/{id}/{action}", post(instance_action))
        .route("/scheduler/queue/{id}/kill", post(kill_container))
        .route_layer(guard(Need::Manage));
    let authed = read.merge(submit).merge(manage);
    Router::new()
        .route("/_health/ping", get(health))
        .merge(authed)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method".into(),
            )
        })
        .with_state(state)
}

/// No token: a load balancer's check. 503 when the runner deployed to VMs cannot be read
/// (the file's path goes to the log, not to an unauthenticated caller).
async fn health(State(state): State<ApiState>) -> Response {
    match state.runner.check_readable() {
        Ok(()) => Json(serde_json::json!({"health": "OK"})).into_response(),
        Err(error) => {
            log::error!("Health check failing: {error}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({
                    "health": "ERROR",
                    "error": "the runner binary cannot be read (the log names it); restart serve after fixing it",
                })),
            )
                .into_response()
        }
    }
}

/// One container (an object), or many (an array: all are queued, or none).
async fn submit(
    State(state): State<ApiState>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let bad = |e: serde_json::Error| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
    if body.is_array() {
        let batch: Vec<NewContainer> = serde_json::from_value(body).map_err(bad)?;
        if batch.is_empty() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "an empty array submits nothing".into(),
            ));
        }
        let made = state.queue.submit_many(batch)?;
        for c in &made {
            log::info!("container={} submitted priority={}", c.id, c.priority);
        }
        state.dispatcher.poke();
        return Ok((StatusCode::CREATED, Json(made)).into_response());
    }
    let new: NewContainer = serde_json::from_value(body).map_err(bad)?;
    let c = state.queue.submit(new)?;
    log::info!("container={} submitted priority={}", c.id, c.priority);
    state.dispatcher.poke();
    Ok((StatusCode::CREATED, Json(c)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    active: bool,
    /// A page of at most this many, newest first; the `Link` header names the next page.
    limit: Option<usize>,
    /// The cursor from the previous page's `Link`.
    before: Option<i64>,
}

/// The largest page served.
const MAX_PAGE: usize = 10_000;

async fn list(
    State(state): State<ApiState>,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Response, ApiError> {
    let (mut list, next) = match q.limit {
        None => (state.queue.list(q.active)?, None),
        Some(limit) => {
            if q.active {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "active and limit cannot be combined".into(),
                ));
            }
            let limit = limit.clamp(1, MAX_PAGE);
            let page = state.queue.page(limit, q.before)?;
            let next = (page.len() == limit)
                .then(|| page.last().map(|c| c.seq))
                .flatten();
            (page, next)
        }
    };
    let view = state.dispatcher.scheduler_queue();
    for c in &mut list {
        c.scheduling_status = waiting_status(&view, &c.id);
    }
    let mut response = Json(list).into_response();
    if let (Some(seq), Some(limit)) = (next, q.limit) {
        let link = format!("</containers?limit={limit}&before={seq}>; rel=\"next\"");
        if let Ok(value) = header::HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

async fn get_one(
    State(state): State<ApiState>,
    PathArg(id): PathArg<String>,
) -> Result<Json<crate::queue::Container>, ApiError> {
    let mut c = state.queue.get(&id)?;
    c.scheduling_status = waiting_status(&state.dispatcher.scheduler_queue(), &id);
    Ok(Json(c))
}

/// Why a container waits; `None` once it is on a VM (its `instance_id` says where).
fn waiting_status(view: &SchedulerQueue, id: &str) -> Option<String> {
    view.get(id)
        .filter(|e| e.instance.is_none())
        .map(|e| e.scheduling_status.to_string())
}

/// `GET /scheduler/queue`: every active container in the order the scheduler serves them.
async fn scheduler_queue(State(state): State<ApiState>) -> Result<Response, ApiError> {
    // Serialized from the shared snapshot: a long queue is not copied per request.
    let body = serde_json::to_vec(&state.dispatcher.scheduler_queue().entries)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /scheduler/queue/{id}`: one entry; 404 when it is not (or no longer) active.
async fn scheduler_entry(
    State(state): State<ApiState>,
    PathArg(id): PathArg<String>,
) -> Result<Json<QueueEntry>, ApiError> {
    state
        .dispatcher
        .scheduler_queue()
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| not_in_queue(&id))
}

fn not_in_queue(id: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("container {id} is not in the scheduler's queue"),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillBody {
    reason: Option<String>,
}

/// `POST /scheduler/queue/{id}/kill` with `{"reason": …}`: cancels a container that runs on a
/// VM, so the scheduler stops its process (SIGTERM, then again until it ends). 404 when it
/// is not on any VM, 400 without a reason.
async fn kill_container(
    State(state): State<ApiState>,
    PathArg(id): PathArg<String>,
    body: axum::body::Bytes,
) -> Result<Json<crate::queue::Container>, ApiError> {
    let body: KillBody = if body.iter().all(u8::is_ascii_whitespace) {
        KillBody { reason: None }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("body: {e}")))?
    };
    let Some(reason) = body.reason.filter(|r| !r.trim().is_empty()) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "reason: required (why the container is killed)".into(),
        ));
    };
    let view = state.dispatcher.scheduler_queue();
    let Some(worker) = view.get(&id).and_then(|e| e.instance.clone()) else {
        return Err(if view.get(&id).is_some() {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("container {id} is not running on any instance"),
            )
        } else {
            not_in_queue(&id)
        });
    };
    let why = format!("killed by an operator: {reason}");
    state.queue.cancel(&id, &why)?;
    log::info!("container={id} instance={worker} to=Cancelled reason={why:?}");
    state.dispatcher.poke();
    Ok(Json(state.queue.get(&id)?))
}

async fn cancel(
    State(state): State<ApiState>,
    PathArg(id): PathArg<String>,
) -> Result<Json<crate::queue::Container>, ApiError> {
    state.queue.cancel(&id, "cancelled by request")?;
    log::info!("container={id} to=Cancelled reason=\"cancelled by request\"");
    state.dispatcher.poke();
    Ok(Json(state.queue.get(&id)?))
}

#[derive(Deserialize)]
struct PriorityBody {
    priority: i64,
}

async fn set_priority(
    State(state): State<ApiState>,
    PathArg(id): PathArg<String>,
    JsonBody(body): JsonBody<PriorityBody>,
) -> Result<Json<crate::queue::Container>, ApiError> {
    state.queue.set_priority(&id, body.priority)?;
    state.dispatcher.poke();
    Ok(Json(state.queue.get(&id)?))
}

/// Streams a log file in chunks: a container's log can be far larger than the server's memory.
async fn logs(
    State(state): State<ApiState>,
    PathArg((id, stream)): PathArg<(String, String)>,
) -> Result<Response, ApiError> {
    if stream != "stdout" && stream != "stderr" {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "stream must be stdout or stderr".into(),
        ));
    }
    let c = state.queue.get(&id)?;
    let Some(dir) = c.log_dir else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("container {id} is {:?}: no logs recorded yet", c.state),
        ));
    };
    let file = match tokio::fs::File::open(std::path::Path::new(&dir).join(&stream)).await {
        Ok(file) => file,
        // The container printed nothing there: no file was written.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((
                [(header::CONTENT_TYPE, "application/octet-stream")],
                Vec::<u8>::new(),
            )
                .into_response())
        }
        Err(e) => {
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {stream}: {e}"),
            ))
        }
    };
    let chunks = futures_util::stream::unfold(Some(file), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            // Reported once; the stream ends after it.
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: Option<String>,
}

/// `POST /instances/{id}/hold|drain|run|kill`, kill with an optional `{"reason": …}`.
async fn instance_action(
    State(state): State<ApiState>,
    PathArg((id, action)): PathArg<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("body: {e}")))?
    };
    let action = parse_action(&action, body.reason)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, unknown_action(&action)))?;
    match state.dispatcher.act(&id, action).await {
        Ok(()) => {
            let view = state
                .dispatcher
                .instances()
                .into_iter()
                .find(|i| i.id == id);
            Ok(Json(serde_json::json!({"id": id, "done": true, "instance": view})).into_response())
        }
        Err(e @ ActionError::NotFound(_)) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ ActionError::ShuttingDown(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// `hold`, `drain`, `run` or `kill`, with the reason given (or a placeholder).
pub(crate) fn parse_action(action: &str, reason: Option<String>) -> Option<InstanceAction> {
    let reason = reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "no reason given".into());
    Some(match action {
        "hold" => InstanceAction::Hold { reason },
        "drain" => InstanceAction::Drain { reason },
        "run" => InstanceAction::Run { reason },
        "kill" => InstanceAction::Kill { reason },
        _ => return None,
    })
}

pub(crate) fn unknown_action(action: &str) -> String {
    format!("no instance action {action:?}: hold, drain, run or kill")
}

/// Prometheus scrapes with a bearer token like any reader (`authorization` in its config).
async fn metrics(State(state): State<ApiState>) -> Response {
    let instances = state.dispatcher.instances();
    let queue = state.dispatcher.scheduler_queue();
    let text = state.metrics.render(&crate::metrics::Snapshot {
        instances: &instances,
        queue: &queue,
        spend: &state.dispatcher.spend(),
        now_ms: crate::queue::now_ms(),
    });
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// `GET /costs`: the fleet's $/h now, what it spent today (UTC) and the cap.
async fn costs(State(state): State<ApiState>) -> Json<crate::cost::Spend> {
    Json(state.dispatcher.spend())
}

async fn instances(State(state): State<ApiState>) -> Json<Vec<crate::pool::InstanceView>> {
    Json(state.dispatcher.instances())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_whole_and_only_whole() {
        let tokens = vec!["s3cret-token".to_string(), "monitor".to_string()];
        assert!(token_matches(&tokens, "s3cret-token"));
        assert!(token_matches(&tokens, "monitor"));
        for wrong in [
            "",
            "s3cret",
            "s3cret-token2",
            "S3CRET-TOKEN",
            "monitor ",
            "x",
        ] {
            assert!(!token_matches(&tokens, wrong), "{wrong:?}");
        }
        assert!(!token_matches(&[], "anything"));
        assert!(
            !token_matches(&["".to_string()], ""),
            "an empty token never opens the API"
        );
    }
}
