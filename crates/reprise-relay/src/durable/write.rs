//! The writer's side of Durable Streams: create (`PUT`), append (`POST`),
//! close (`Stream-Closed: true`) and delete, over [`record`](super::record).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use reprise_core::{Outcome, Seq};

use super::error::DsError;
use super::headers::{self, CLOSED, NEXT_OFFSET};
use super::offset;
use super::record::{self, essence, Appended, Created, Settings};
use crate::body::{empty, Body};
use crate::state::Relay;

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn wants_close(h: &HeaderMap) -> bool {
    header(h, "stream-closed").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The messages of a request body: one, or in JSON mode each element of a
/// top-level array (an empty array is no message).
fn messages(settings: &Settings, body: Bytes) -> Result<Vec<Bytes>, DsError> {
    if !settings.is_json() {
        return Ok(if body.is_empty() { vec![] } else { vec![body] });
    }
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| DsError::BadRequest(format!("invalid JSON: {e}")))?;
    Ok(match value {
        serde_json::Value::Array(items) => {
            items.iter().map(|v| Bytes::from(v.to_string())).collect()
        }
        v => vec![Bytes::from(v.to_string())],
    })
}

fn settings_of(h: &HeaderMap) -> Result<Settings, DsError> {
    let content_type = header(h, "content-type")
        .map(str::to_string)
        .unwrap_or_else(|| "application/octet-stream".into());
    let ttl_secs = match header(h, "stream-ttl") {
        None => None,
        Some(v) => {
            let v = v.trim();
            if v.is_empty()
                || !v.bytes().all(|b| b.is_ascii_digit())
                || (v.len() > 1 && v.starts_with('0'))
            {
                return Err(DsError::BadRequest(format!("invalid Stream-TTL {v:?}")));
            }
            Some(
                v.parse::<u64>()
                    .map_err(|_| DsError::BadRequest("invalid Stream-TTL".into()))?,
            )
        }
    };
    let expires_at = match header(h, "stream-expires-at") {
        None => None,
        Some(v) => {
            humantime::parse_rfc3339_weak(v.trim())
                .map_err(|_| DsError::BadRequest(format!("invalid Stream-Expires-At {v:?}")))?;
            Some(v.trim().to_string())
        }
    };
    if ttl_secs.is_some() && expires_at.is_some() {
        return Err(DsError::BadRequest(
            "give Stream-TTL or Stream-Expires-At, not both".into(),
        ));
    }
    Ok(Settings {
        content_type,
        ttl_secs,
        expires_at,
    })
}

/// `PUT {path}/{name}`: `201` for a new stream, `200` if it exists with the
/// same settings, `409` if with other ones.
pub async fn create(
    relay: &Relay,
    name: &str,
    location: &str,
    h: &HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, DsError> {
    let settings = settings_of(h)?;
    let close = wants_close(h);
    let now = crate::clock::now_ms();
    let store = relay.store.as_ref();
    let (status, found, last) = match record::create(store, name, &settings, now).await? {
        Created::Existing(f) => {
            let same = essence(&f.settings.content_type) == essence(&settings.content_type)
                && f.settings.ttl_secs == settings.ttl_secs
                && f.settings.expires_at == settings.expires_at
                && f.closed() == close;
            if !same {
                return Err(DsError::Conflict {
                    message: "stream exists with another configuration".into(),
                    closed: f.closed(),
                });
            }
            let last = record::tail(store, &f).await?;
            (StatusCode::OK, f, last)
        }
        Created::New(f) => {
            let msgs = if body.is_empty() {
                vec![]
            } else {
                messages(&settings, body)?
            };
            let last = if msgs.is_empty() && !close {
                Seq::ZERO
            } else {
                match record::append(store, f.id, &msgs, close.then_some(Outcome::Completed))
                    .await?
                {
                    Appended::Stored(s) | Appended::WasClosed(s) => s,
                }
            };
            (StatusCode::CREATED, f, last)
        }
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    let rh = resp.headers_mut();
    headers::set(rh, "content-type", &found.settings.content_type);
    headers::set(rh, NEXT_OFFSET, &offset::format(last));
    if status == StatusCode::CREATED {
        headers::set(rh, "location", location);
    }
    if close || found.closed() {
        rh.insert(CLOSED, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// `POST {path}/{name}`: append the body (and close with
/// `Stream-Closed: true`); `204` with the new tail offset.
pub async fn append(
    relay: &Relay,
    name: &str,
    h: &HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, DsError> {
    let store = relay.store.as_ref();
    let now = crate::clock::now_ms();
    let f = record::find(store, name, now)
        .await?
        .ok_or(DsError::NotFound)?;
    let close = wants_close(h);
    if body.is_empty() && !close {
        return Err(DsError::BadRequest("empty append".into()));
    }
    if !body.is_empty() {
        let Some(ct) = header(h, "content-type") else {
            return Err(DsError::BadRequest("Content-Type is required".into()));
        };
        if essence(ct) != essence(&f.settings.content_type) {
            return Err(DsError::Conflict {
                message: "content type does not match the stream's".into(),
                closed: f.closed(),
            });
        }
    }
    let msgs = if body.is_empty() {
        vec![]
    } else {
        messages(&f.settings, body)?
    };
    if msgs.is_empty() && !close {
        return Err(DsError::BadRequest("empty JSON array".into()));
    }
    let outcome = record::append(store, f.id, &msgs, close.then_some(Outcome::Completed)).await?;
    let last = match outcome {
        Appended::Stored(s) => s,
        // Closing a closed stream again is idempotent; appending is not.
        Appended::WasClosed(s) if msgs.is_empty() => s,
        Appended::WasClosed(s) => {
            let mut resp = DsError::Conflict {
                message: "stream is closed".into(),
                closed: true,
            }
            .into_response();
            headers::set(resp.headers_mut(), NEXT_OFFSET, &offset::format(s));
            return Ok(resp);
        }
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let rh = resp.headers_mut();
    headers::set(rh, NEXT_OFFSET, &offset::format(last));
    if close || matches!(outcome, Appended::WasClosed(_)) {
        rh.insert(CLOSED, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// `DELETE {path}/{name}`: `204`, or `404`.
pub async fn delete(relay: &Relay, name: &str) -> Result<Response<Body>, DsError> {
    let store = relay.store.as_ref();
    let f = record::find(store, name, crate::clock::now_ms())
        .await?
        .ok_or(DsError::NotFound)?;
    record::delete(store, name, &f).await?;
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}
