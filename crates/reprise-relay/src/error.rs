//! Errors of the relay layer and the one place they become HTTP responses.

use http::{header, HeaderValue, Response, StatusCode};
use reprise_store::{LimitKind, StoreError};
use serde_json::json;

use crate::body::{full, Body};

/// Seconds a client is told to wait before retrying a 503.
const RETRY_AFTER_SECS: u64 = 2;

/// What went wrong while handling a request, before its response started.
/// After a stream's response has started, failures are recorded in the
/// stream and signalled in-band instead (see `reprise_core::outcome`).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The client sent something invalid (a malformed id, a bad query value).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The named stream does not exist (or is not the caller's).
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// The request body is larger than `limits.max_request_body`.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// No route matches the path.
    #[error("no route for this path")]
    NoRoute,
    /// A `/_reprise/...` endpoint called with a method it does not take;
    /// `allow` lists those it does (the `Allow` header).
    #[error("method not allowed here; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    /// The upstream could not be reached or broke before answering.
    #[error("upstream unavailable: {0}")]
    Upstream(String),
    /// The upstream did not answer in time.
    #[error("upstream timed out: {0}")]
    UpstreamTimeout(String),
    /// The caller is over a rate limit (`limits.max_streams_per_caller`,
    /// `limits.max_starts_per_caller_per_minute`); nothing was counted.
    #[error("rate limited: at most {max} {} per caller", limit_text(*.limit))]
    RateLimited {
        limit: LimitKind,
        max: u32,
        retry_after: std::time::Duration,
    },
    /// `limits.max_connections` connections are already open.
    #[error("too many connections; retry later")]
    TooManyConnections,
    /// The store is unreachable: retry later.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// A bug or an invariant broken in the store's data.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for RelayError {
    fn from(e: StoreError) -> Self {
        match e {
            // Refused credentials at run time (a rotated password): for the
            // client, the store is as unavailable as during an outage.
            StoreError::Unavailable(m) | StoreError::AuthFailed(m) => {
                RelayError::StoreUnavailable(m)
            }
            other => RelayError::Internal(other.to_string()),
        }
    }
}

impl RelayError {
    pub fn status(&self) -> StatusCode {
        match self {
            RelayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            RelayError::NotFound { .. } | RelayError::NoRoute => StatusCode::NOT_FOUND,
            RelayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RelayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RelayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            RelayError::Upstream(_) => StatusCode::BAD_GATEWAY,
            RelayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RelayError::StoreUnavailable(_) | RelayError::TooManyConnections => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RelayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Machine-readable code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            RelayError::BadRequest { code, .. } | RelayError::NotFound { code, .. } => code,
            RelayError::PayloadTooLarge { .. } => "payload_too_large",
            RelayError::RateLimited { .. } => "rate_limited",
            RelayError::NoRoute => "no_route",
            RelayError::MethodNotAllowed { .. } => "method_not_allowed",
            RelayError::Upstream(_) => "upstream_unavailable",
            RelayError::UpstreamTimeout(_) => "upstream_timeout",
            RelayError::StoreUnavailable(_) => "store_unavailable",
            RelayError::TooManyConnections => "too_many_connections",
            RelayError::Internal(_) => "internal",
        }
    }

    /// `{"error": {"code": "...", "message": "..."}}` with the matching status
    /// (a `429` also says which `limit` and in how many seconds to retry).
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        let mut retry_after = None;
        if let RelayError::RateLimited {
            limit,
            retry_after: after,
            ..
        } = &self
        {
            // Whole seconds, rounded up, at least 1.
            let secs = after.as_millis().div_ceil(1000).max(1) as u64;
            error["limit"] = json!(limit.as_str());
            error["retry_after"] = json!(secs);
            retry_after = Some(secs);
        }
        let body = json!({ "error": error });
        let mut resp = Response::new(full(body.to_string()));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let RelayError::MethodNotAllowed { allow } = &self {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            retry_after = Some(RETRY_AFTER_SECS);
        }
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn limit_text(limit: LimitKind) -> &'static str {
    match limit {
        LimitKind::Concurrent => "concurrent streams",
        LimitKind::StartsPerMinute => "stream starts per minute",
    }
}
