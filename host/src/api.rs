//! The HTTP API (JSON over HTTP, bearer-token auth): containers and instances. Only this module
//! knows HTTP; the CLI talks to it through `client`.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::dispatcher::DispatcherHandle;
use crate::queue::{NewContainer, Queue, QueueError};

#[derive(Clone)]
pub struct ApiState {
    pub queue: Arc<dyn Queue>,
    pub dispatcher: DispatcherHandle,
    pub tokens: Arc<Vec<String>>,
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

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if state.tokens.iter().any(|t| t == token) => next.run(request).await,
        _ => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response(),
    }
}

pub fn router(state: ApiState) -> Router {
    let authed = Router::new()
        .route("/containers", post(submit).get(list))
        .route("/containers/{id}", get(get_one))
        .route("/containers/{id}/cancel", post(cancel))
        .route("/containers/{id}/priority", post(set_priority))
        .route("/containers/{id}/logs/{stream}", get(logs))
        .route("/instances", get(instances))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(
            "/_health/ping",
            get(|| async { Json(serde_json::json!({"health": "OK"})) }),
        )
        .merge(authed)
        .with_state(state)
}

async fn submit(
    State(state): State<ApiState>,
    Json(new): Json<NewContainer>,
) -> Result<(StatusCode, Json<crate::queue::Container>), ApiError> {
    let c = state.queue.submit(new)?;
    log::info!("container={} submitted priority={}", c.id, c.priority);
    state.dispatcher.poke();
    Ok((StatusCode::CREATED, Json(c)))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    active: bool,
}

async fn list(
    State(state): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<crate::queue::Container>>, ApiError> {
    let mut list = state.queue.list(q.active)?;
    let waiting = state.dispatcher.waiting();
    for c in &mut list {
        c.scheduling_status = waiting.get(&c.id).cloned();
    }
    Ok(Json(list))
}

async fn get_one(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<crate::queue::Container>, ApiError> {
    let mut c = state.queue.get(&id)?;
    c.scheduling_status = state.dispatcher.waiting().get(&id).cloned();
    Ok(Json(c))
}

async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
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
    Path(id): Path<String>,
    Json(body): Json<PriorityBody>,
) -> Result<Json<crate::queue::Container>, ApiError> {
    state.queue.set_priority(&id, body.priority)?;
    state.dispatcher.poke();
    Ok(Json(state.queue.get(&id)?))
}

async fn logs(
    State(state): State<ApiState>,
    Path((id, stream)): Path<(String, String)>,
) -> Result<Vec<u8>, ApiError> {
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
    std::fs::read(std::path::Path::new(&dir).join(&stream)).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading {stream}: {e}"),
        )
    })
}

async fn instances(State(state): State<ApiState>) -> Json<Vec<crate::pool::InstanceView>> {
    Json(state.dispatcher.instances())
}
