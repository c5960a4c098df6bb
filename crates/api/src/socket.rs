//! The control socket's protection: created mode 0600 with no umask window, and every
//! connection's peer uid checked (`SO_PEERCRED`).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use axum::Json;
use serde_json::json;

/// Binds a listening socket at `path` that only its owner may open: the socket is bound in a
/// fresh 0700 directory beside `path`, set to 0600 and only then renamed into place. An
/// existing stale socket is replaced; a live one, or anything that is not a socket, is refused.
/// Returns the listener and the uid owning the socket.
pub fn bind_private(path: &Path) -> std::io::Result<(UnixListener, u32)> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket exists there; remove it or choose another --api-sock",
            ))
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another monitor is listening there; choose another --api-sock",
            ))
        }
        _ => {}
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket path has no file name",
        )
    })?;
    // tempfile creates the directory with mode 0700: nobody else can reach the socket in it.
    let private = tempfile::Builder::new()
        .prefix(".ftvm-api-")
        .tempdir_in(parent)?;
    let staged = private.path().join(name);
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(&staged)?.uid();
    // rename(2) replaces a stale socket (or a symlink) at `path` itself, never its target.
    std::fs::rename(&staged, path)?;
    Ok((listener, owner))
}

/// The peer of one control connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Peer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// Lets through root and the socket's owner; answers anyone else 403 and does nothing.
pub async fn only_owner(
    State(owner): State<u32>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    match peer.uid {
        Some(uid) if uid == 0 || uid == owner => next.run(req).await,
        uid => {
            tracing::warn!("control API: refused a request from uid {uid:?}");
            (
                StatusCode::FORBIDDEN,
                Json(json!({
                    "error": format!(
                        "uid {} may not control this VM: only root and uid {owner} may",
                        uid.map(|u| u.to_string()).unwrap_or_else(|| "unknown".into())
                    )
                })),
            )
                .into_response()
        }
    }
}
