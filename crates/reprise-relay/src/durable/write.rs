//! The writer's side of Durable Streams: create (`PUT`), append (`POST`),
//! close (`Stream-Closed: true`) and delete, over [`record`](super::record).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use reprise_core::{Outcome, Seq};
use reprise_store::{Checked, ProducerClaim, WriterChecks};

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
                let checks = WriterChecks::default();
                let outcome = close.then_some(Outcome::Completed);
                match record::append(store, f.id, &msgs, outcome, &checks).await? {
                    Appended::Stored(s) | Appended::WasClosed(s) => s,
                    // No checks, so neither can happen.
                    Appended::Duplicate { .. } | Appended::Refused(_) => Seq::ZERO,
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

/// Largest `Producer-Epoch` / `Producer-Seq` (JavaScript's safe integers,
/// as the protocol's clients count).
const MAX_PRODUCER_NUMBER: u64 = (1 << 53) - 1;

/// The writer checks of an append's headers: `Producer-Id`,
/// `Producer-Epoch` and `Producer-Seq` (all three or none), `Stream-Seq`.
fn writer_checks(h: &HeaderMap) -> Result<WriterChecks, DsError> {
    let id = header(h, "producer-id");
    let epoch = header(h, "producer-epoch");
    let seq = header(h, "producer-seq");
    let number = |name: &str, v: &str| {
        let ok = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        v.parse::<u64>()
            .ok()
            .filter(|n| ok && *n <= MAX_PRODUCER_NUMBER)
            .ok_or_else(|| {
                DsError::BadRequest(format!("invalid {name}: must be a non-negative integer"))
            })
    };
    let producer = match (id, epoch, seq) {
        (None, None, None) => None,
        (Some(id), Some(epoch), Some(seq)) => {
            if id.is_empty() {
                return Err(DsError::BadRequest("invalid Producer-Id: empty".into()));
            }
            Some(ProducerClaim {
                id: id.to_string(),
                epoch: number("Producer-Epoch", epoch)?,
                seq: number("Producer-Seq", seq)?,
            })
        }
        _ => {
            return Err(DsError::BadRequest(
                "Producer-Id, Producer-Epoch and Producer-Seq go together".into(),
            ))
        }
    };
    Ok(WriterChecks {
        producer,
        stream_seq: header(h, "stream-seq").map(str::to_string),
    })
}

/// `POST {path}/{name}`: append the body (and close with
/// `Stream-Closed: true`); `204` with the new tail offset (`200` with
/// `Producer-Epoch` and `Producer-Seq` for an idempotent producer's data).
pub async fn append(
    relay: &Relay,
    name: &str,
    h: &HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, DsError> {
    let checks = writer_checks(h)?;
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
    let outcome = close.then_some(Outcome::Completed);
    let appended = record::append(store, f.id, &msgs, outcome, &checks).await?;
    let producer = checks.producer.as_ref();
    let (status, last, closed, producer_seq) = match appended {
        Appended::Stored(s) => {
            // The reference server answers a producer's append `200`, its
            // close-only `204`.
            let status = match producer {
                Some(_) if !msgs.is_empty() => StatusCode::OK,
                _ => StatusCode::NO_CONTENT,
            };
            (status, Some(s), close, producer.map(|p| p.seq))
        }
        // Closing a closed stream again is idempotent; appending is not,
        // nor is a producer's close that did not close it.
        Appended::WasClosed(s) if msgs.is_empty() && producer.is_none() => {
            (StatusCode::NO_CONTENT, Some(s), true, None)
        }
        Appended::WasClosed(s) => {
            let mut resp = DsError::Conflict {
                message: "stream is closed".into(),
                closed: true,
            }
            .into_response();
            headers::set(resp.headers_mut(), NEXT_OFFSET, &offset::format(s));
            return Ok(resp);
        }
        Appended::Duplicate {
            producer_seq,
            closed_at,
        } => (
            StatusCode::NO_CONTENT,
            closed_at,
            closed_at.is_some(),
            Some(producer_seq),
        ),
        Appended::Refused(Checked::StaleEpoch { current }) => {
            return Err(DsError::StaleEpoch { current })
        }
        Appended::Refused(Checked::NewEpochNeedsSeqZero) => {
            return Err(DsError::BadRequest(
                "a new Producer-Epoch must start at Producer-Seq 0".into(),
            ))
        }
        Appended::Refused(Checked::SeqGap { expected, received }) => {
            return Err(DsError::SeqGap { expected, received })
        }
        Appended::Refused(_) => {
            return Err(DsError::Conflict {
                message: "Stream-Seq does not follow the last one".into(),
                closed: false,
            })
        }
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    let rh = resp.headers_mut();
    if let Some(last) = last {
        headers::set(rh, NEXT_OFFSET, &offset::format(last));
    }
    if closed {
        rh.insert(CLOSED, HeaderValue::from_static("true"));
    }
    if let (Some(p), Some(seq)) = (producer, producer_seq) {
        headers::set(rh, "producer-epoch", &p.epoch.to_string());
        headers::set(rh, "producer-seq", &seq.to_string());
    }
    Ok(resp)
}

/// `DELETE {path}/{name}`: `204`, or `404`.
pub async fn delete(relay: &Relay, name: &str) -> Result<Response<Body>, DsError> {
    let store = relay.store.as_ref();
    let f = record::peek(store, name, crate::clock::now_ms())
        .await?
        .ok_or(DsError::NotFound)?;
    record::delete(store, name, &f).await?;
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}
