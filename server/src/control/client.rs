//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::protocol::{Response, RpcError};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error("cannot reach udm at {path}: {source} (is `udm serve` running? pass --control PATH or set UDM_CONTROL)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or the reply was not JSON-RPC.
    #[error("control connection: {0}")]
    Protocol(String),
    /// The daemon refused the call.
    #[error("{}", .0.message)]
    Rpc(RpcError),
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.into(), source })?;
        let writer = s.try_clone().map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Client { reader: BufReader::new(s), writer, next_id: 1 })
    }

    /// Calls `method` with named `params`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).to_string();
        line.push('\n');
        // A daemon that refuses the request (too long, too many connections) replies
        // and closes: if the write fails, its reply may still be there to read.
        let sent = self.writer.write_all(line.as_bytes());
        let mut reply = String::new();
        let read = self.reader.read_line(&mut reply);
        match (sent, read) {
            (_, Ok(n)) if n > 0 => {}
            (Err(e), _) => return Err(ClientError::Protocol(format!("sending the request: {e}"))),
            (Ok(()), Err(e)) => return Err(ClientError::Protocol(e.to_string())),
            (Ok(()), Ok(_)) => return Err(ClientError::Protocol("the daemon closed the connection".into())),
        }
        let resp: Response =
            serde_json::from_str(&reply).map_err(|e| ClientError::Protocol(format!("bad reply: {e}")))?;
        match (resp.result, resp.error) {
            (_, Some(e)) => Err(ClientError::Rpc(e)),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Value::Null),
        }
    }
}
