//! The admin commands' side of the control socket: one JSON request, one JSON answer (the
//! requests are listed in `crate::daemon::control`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long the daemon may take to answer (a reload can take a while).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket: the daemon is not running (or uses another socket).
    #[error("cannot reach the daemon at {path}: {source} (is postern running, with this config?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The exchange broke off or the answer was not JSON.
    #[error("control socket {path}: {message}")]
    Exchange {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Sends one request to the daemon behind the socket at `path` and returns its answer.
pub async fn request(path: &Path, request: &Value) -> Result<Value, ControlError> {
    let exchange = |message: String| ControlError::Exchange { path: path.to_owned(), message };
    let stream =
        UnixStream::connect(path).await.map_err(|source| ControlError::Connect { path: path.to_owned(), source })?;
    let work = async {
        let (read, mut write) = stream.into_split();
        write.write_all(format!("{request}\n").as_bytes()).await?;
        write.shutdown().await?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        Ok::<_, io::Error>(line)
    };
    let line = tokio::time::timeout(ANSWER_TIMEOUT, work)
        .await
        .map_err(|_| exchange("no answer within 60 s".into()))?
        .map_err(|e| exchange(e.to_string()))?;
    serde_json::from_str(&line).map_err(|e| exchange(format!("the answer is not JSON: {e}")))
}
