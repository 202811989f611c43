//! JSON-RPC 2.0 objects (<https://www.jsonrpc.org/specification>).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Invalid JSON was received.
pub const PARSE_ERROR: i64 = -32700;
/// The JSON is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// The operation was refused or failed (the message says why); nothing changed.
pub const OPERATION_FAILED: i64 = -32000;

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Must be "2.0".
    pub jsonrpc: String,
    /// Method name, e.g. `dm.create`.
    pub method: String,
    /// Named parameters (an object) or none.
    #[serde(default)]
    pub params: Option<Value>,
    /// Request id (absent for notifications, which get no response).
    #[serde(default)]
    pub id: Option<Value>,
}

/// An error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (JSON-RPC error {code})")]
pub struct RpcError {
    /// One of the codes above.
    pub code: i64,
    /// What was wrong and what to do.
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }
}

/// A response: exactly one of `result` and `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// "2.0".
    pub jsonrpc: String,
    /// The result on success.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<Value>,
    /// The error on failure.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<RpcError>,
    /// The request's id (null when it could not be read).
    pub id: Value,
}

impl Response {
    /// A success.
    pub fn ok(id: Value, result: Value) -> Self {
        Response { jsonrpc: "2.0".into(), result: Some(result), error: None, id }
    }

    /// A failure.
    pub fn err(id: Value, error: RpcError) -> Self {
        Response { jsonrpc: "2.0".into(), result: None, error: Some(error), id }
    }
}
