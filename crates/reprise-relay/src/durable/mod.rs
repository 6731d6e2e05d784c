//! Durable Streams (docs/durable.md), just below dispatch: streams created
//! and appended to by a writer over HTTP under `durable.path`, read by
//! offset in catch-up, long-poll or SSE mode, kept in the store like
//! recorded streams. [`handle`] checks credentials and sends each method to
//! [`write`] or [`read`] / [`sse`]; [`record`] maps a stream onto the
//! store; [`offset`], [`headers`], [`access`] and [`error`] are leaves.

pub mod access;
pub mod error;
pub mod headers;
pub mod offset;
pub mod proxy;
pub mod read;
pub mod record;
pub mod recorded;
pub mod sse;
pub mod write;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use self::access::Need;
use self::error::DsError;
use crate::body::{empty, Body};
use crate::state::Relay;
use crate::uri::query_param;

/// The stream name of `path` if it is under `durable.path`.
pub fn stream_name<'a>(relay: &Relay, path: &'a str) -> Option<&'a str> {
    let d = &relay.config.durable;
    if !d.enabled {
        return None;
    }
    let rest = path.strip_prefix(d.path.as_str())?.strip_prefix('/')?;
    (!rest.is_empty()).then_some(rest)
}

/// Serves one Durable Streams request for stream `name`.
pub async fn handle(relay: &Arc<Relay>, req: Request<Incoming>, name: String) -> Response<Body> {
    let mut resp = serve(relay, req, &name)
        .await
        .unwrap_or_else(DsError::into_response);
    headers::security(resp.headers_mut());
    resp
}

async fn serve(
    relay: &Arc<Relay>,
    req: Request<Incoming>,
    name: &str,
) -> Result<Response<Body>, DsError> {
    let config = &relay.config.durable;
    let method = req.method().clone();
    if method == Method::OPTIONS {
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        headers::preflight(resp.headers_mut());
        return Ok(resp);
    }
    let need = match method {
        Method::GET | Method::HEAD => Need::Read,
        Method::PUT | Method::POST | Method::DELETE => Need::Write,
        _ => return Err(DsError::MethodNotAllowed),
    };
    let now = crate::clock::now_ms();
    let query = req.uri().query().unwrap_or("");
    if !(need == Need::Read && access::signed_read(&relay.config, query, name, now)) {
        access::check(config, req.headers(), need)?;
    }
    let (parts, body) = req.into_parts();
    let location = location(relay, &parts);
    let read_url = access::read_url(&relay.config, &location, name, now);
    let mut resp = match method {
        Method::PUT => {
            let body = read_body(relay, body).await?;
            write::create(relay, name, &location, &parts.headers, body).await?
        }
        Method::POST => {
            let body = read_body(relay, body).await?;
            write::append(relay, name, &parts.headers, body).await?
        }
        Method::DELETE => return write::delete(relay, name).await,
        Method::HEAD => return read::head(relay, name).await,
        _ => return get(relay, name, &parts).await,
    };
    // The writer hands this to its readers.
    if let Some(url) = read_url {
        headers::set(resp.headers_mut(), "stream-read-url", &url);
    }
    Ok(resp)
}

async fn get(
    relay: &Arc<Relay>,
    name: &str,
    parts: &http::request::Parts,
) -> Result<Response<Body>, DsError> {
    let query = parts.uri.query().unwrap_or("");
    let raw_offset = query_param(query, "offset");
    let live = query_param(query, "live");
    let cursor = query_param(query, "cursor");
    let start = match raw_offset.as_deref() {
        None => offset::Start::Beginning,
        Some(o) => offset::parse(o)?,
    };
    let store = relay.store.as_ref();
    let f = record::find(store, name, crate::clock::now_ms())
        .await?
        .ok_or(DsError::NotFound)?;
    match live.as_deref() {
        None => read::get(relay, &f, start, false, cursor.as_deref(), &parts.headers).await,
        Some(mode @ ("long-poll" | "sse")) => {
            if raw_offset.is_none() {
                return Err(DsError::BadRequest(format!("live={mode} needs an offset")));
            }
            if mode == "long-poll" {
                return read::get(relay, &f, start, true, cursor.as_deref(), &parts.headers).await;
            }
            let from = read::start_seq(store, &f, start).await?;
            sse::open(relay, f, from, cursor)
        }
        Some(other) => Err(DsError::BadRequest(format!("unknown live mode {other:?}"))),
    }
}

/// The stream's absolute URL (`Location` of a create), from the request's
/// `Host` (or HTTP/2 authority).
fn location(relay: &Relay, parts: &http::request::Parts) -> String {
    let scheme = if relay.tls.is_some() { "https" } else { "http" };
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    match host {
        Some(h) => format!("{scheme}://{h}{}", parts.uri.path()),
        None => parts.uri.path().to_string(),
    }
}

async fn read_body(relay: &Relay, body: Incoming) -> Result<Bytes, DsError> {
    let limit = relay.config.limits.max_request_body.as_u64() as usize;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(DsError::PayloadTooLarge),
        Err(e) => Err(DsError::BadRequest(format!("could not read the body: {e}"))),
    }
}
