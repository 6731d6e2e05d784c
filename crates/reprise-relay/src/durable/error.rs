//! Errors of the Durable Streams server and their HTTP answers (plain text
//! bodies, as the protocol's reference server gives). A leaf of `durable`.

use http::{HeaderValue, Response, StatusCode};

use crate::body::{full, Body};
use crate::error::RelayError;

/// What a Durable Streams request can fail with, before its answer starts.
#[derive(Debug, thiserror::Error)]
pub enum DsError {
    /// Malformed headers, offset or body.
    #[error("{0}")]
    BadRequest(String),
    /// No credential, or not one that allows this.
    #[error("a bearer token or a signed URL is required")]
    Unauthorized,
    /// No such stream (or it expired or was deleted).
    #[error("stream not found")]
    NotFound,
    /// The request contradicts the stream (content type, configuration);
    /// `closed` when the stream is closed (answered with `Stream-Closed: true`).
    #[error("{message}")]
    Conflict { message: String, closed: bool },
    /// An idempotent producer's epoch is older than the stream knows (a
    /// zombie writer): `403` with the current `Producer-Epoch`.
    #[error("stale producer epoch")]
    StaleEpoch { current: u64 },
    /// An idempotent producer skipped seqs: `409` with
    /// `Producer-Expected-Seq` and `Producer-Received-Seq`.
    #[error("producer sequence gap")]
    SeqGap { expected: u64, received: u64 },
    /// The body is larger than `limits.max_request_body`.
    #[error("request body too large")]
    PayloadTooLarge,
    /// A method the stream URL does not take.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The store failed.
    #[error(transparent)]
    Relay(#[from] RelayError),
}

impl From<reprise_store::StoreError> for DsError {
    fn from(e: reprise_store::StoreError) -> Self {
        DsError::Relay(e.into())
    }
}

impl DsError {
    pub fn into_response(self) -> Response<Body> {
        let status = match &self {
            DsError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DsError::Unauthorized => StatusCode::UNAUTHORIZED,
            DsError::NotFound => StatusCode::NOT_FOUND,
            DsError::Conflict { .. } | DsError::SeqGap { .. } => StatusCode::CONFLICT,
            DsError::StaleEpoch { .. } => StatusCode::FORBIDDEN,
            DsError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            DsError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            DsError::Relay(e) => return relay_error(e),
        };
        let mut resp = Response::new(full(self.to_string()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            DsError::Conflict { closed: true, .. } => {
                h.insert("stream-closed", HeaderValue::from_static("true"));
            }
            DsError::StaleEpoch { current } => {
                h.insert("producer-epoch", HeaderValue::from(current));
            }
            DsError::SeqGap { expected, received } => {
                h.insert("producer-expected-seq", HeaderValue::from(expected));
                h.insert("producer-received-seq", HeaderValue::from(received));
            }
            _ => {}
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, PUT, POST, DELETE, OPTIONS"),
            );
        }
        resp
    }
}

fn relay_error(e: &RelayError) -> Response<Body> {
    let mut resp = Response::new(full(e.to_string()));
    *resp.status_mut() = e.status();
    resp
}
