//! The control API of a running monitor: HTTP/1.1 with JSON bodies on a Unix socket.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /status | | the VM's status |
//! | POST | /pause | | pause time |
//! | POST | /resume | | |
//! | POST | /snapshot | `{"path": "/x.snap"}` | file, size, pause time |
//! | POST | /shutdown | | |
//! | GET | /memory-checksum | | CRC32 of guest memory (VM must be paused) |
//!
//! Errors answer 4xx/5xx with `{"error": "..."}`. The socket is created mode 0600, and a
//! connection from any uid other than root's and the socket owner's is answered 403.

mod socket;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};

/// What the API can ask of a running VM. Implementations may block; they run off the reactor.
pub trait Control: Send + Sync + 'static {
    /// Current status.
    fn status(&self) -> Value;
    /// Pauses the VM.
    fn pause(&self) -> Result<Value, String>;
    /// Resumes the VM.
    fn resume(&self) -> Result<Value, String>;
    /// Writes a complete snapshot to `path`.
    fn snapshot(&self, path: &Path) -> Result<Value, String>;
    /// Stops the VM; the monitor then exits.
    fn shutdown(&self) -> Result<Value, String>;
    /// Checksum of guest memory.
    fn memory_checksum(&self) -> Result<Value, String>;
}

/// API errors.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Socket trouble.
    #[error("control socket {path}: {error}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{0}")]
    Remote(String),
    /// Protocol trouble.
    #[error("control API: {0}")]
    Protocol(String),
}

/// A running API server; dropping it stops the server and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

type Ctl = Arc<dyn Control>;

async fn call(
    ctl: Ctl,
    f: impl FnOnce(&dyn Control) -> Result<Value, String> + Send + 'static,
) -> (StatusCode, Json<Value>) {
    match tokio::task::spawn_blocking(move || f(ctl.as_ref())).await {
        Ok(Ok(v)) => (StatusCode::OK, Json(v)),
        Ok(Err(e)) => (StatusCode::CONFLICT, Json(json!({ "error": e }))),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e.to_string() })),
        ),
    }
}

fn router(ctl: Ctl) -> Router {
    Router::new()
        .route(
            "/status",
            get(|State(c): State<Ctl>| async move { call(c, |c| Ok(c.status())).await }),
        )
        .route(
            "/pause",
            post(|State(c): State<Ctl>| async move { call(c, |c| c.pause()).await }),
        )
        .route(
            "/resume",
            post(|State(c): State<Ctl>| async move { call(c, |c| c.resume()).await }),
        )
        .route(
            "/shutdown",
            post(|State(c): State<Ctl>| async move { call(c, |c| c.shutdown()).await }),
        )
        .route(
            "/memory-checksum",
            get(|State(c): State<Ctl>| async move { call(c, |c| c.memory_checksum()).await }),
        )
        .route(
            "/snapshot",
            post(|State(c): State<Ctl>, Json(body): Json<Value>| async move {
                let Some(path) = body.get("path").and_then(Value::as_str).map(PathBuf::from) else {
                    return (
                        StatusCode::BAD_REQUEST,
                        Json(
                            json!({ "error": "body must be {\"path\": \"/where/to/write.snap\"}" }),
                        ),
                    );
                };
                call(c, move |c| c.snapshot(&path)).await
            }),
        )
        .with_state(ctl)
}

/// Serves the API on a Unix socket at `path` (an existing stale socket file is replaced).
pub fn serve(path: &Path, ctl: Arc<dyn Control>) -> Result<ApiServer, ApiError> {
    let sock_err = |error| ApiError::Socket {
        path: path.display().to_string(),
        error,
    };
    let (std_listener, owner) = socket::bind_private(path).map_err(sock_err)?;
    std_listener.set_nonblocking(true).map_err(sock_err)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("control API runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("control API socket: {e}");
                        return;
                    }
                };
                let app = router(ctl)
                    .layer(axum::middleware::from_fn_with_state(
                        owner,
                        socket::only_owner,
                    ))
                    .into_make_service_with_connect_info::<socket::Peer>();
                let server = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = server.await {
                    tracing::error!("control API: {e}");
                }
            });
        })
        .map_err(sock_err)?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// Sends one request to the API at `sock` and returns the JSON answer.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ApiError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ApiError::Protocol(e.to_string()))?;
    rt.block_on(request_async(sock, method, path, body))
}

async fn request_async(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ApiError> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|error| ApiError::Socket {
            path: format!(
                "{} (is the monitor running with --api-sock?)",
                sock.display()
            ),
            error,
        })?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ApiError::Protocol(e.to_string()))?;
    tokio::spawn(conn);
    let body_bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "ftvm")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body_bytes)))
        .map_err(|e| ApiError::Protocol(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ApiError::Protocol(e.to_string()))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::Protocol(e.to_string()))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&bytes) }));
    if !status.is_success() {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        return Err(ApiError::Remote(msg));
    }
    Ok(value)
}
