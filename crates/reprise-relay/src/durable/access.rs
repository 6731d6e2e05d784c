//! Who may read and write Durable Streams: bearer tokens from `[durable]`
//! (`write_token`, `read_token`), or for reads a pre-signed URL (HMAC under
//! `auth.secret`, with an expiry), unless anonymous access is configured.
//! Consulted by the handlers before they touch the store.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::error::DsError;
use crate::config::{Config, DurableConfig};
use crate::uri::query_param;

type HmacSha256 = Hmac<Sha256>;

/// The signature of a read URL for stream `name` valid until `expires`
/// (Unix seconds), or `None` without a configured `auth.secret` (the
/// built-in fallback key is public, so it signs nothing).
fn signature(config: &Config, name: &str, expires: u64) -> Option<String> {
    let secret = config.auth.secret.as_ref()?;
    let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes()).ok()?;
    mac.update(b"reprise durable read\n");
    mac.update(name.as_bytes());
    mac.update(b"\n");
    mac.update(expires.to_string().as_bytes());
    Some(hex::encode(mac.finalize().into_bytes()))
}

/// A pre-signed read URL of stream `name` at `location`, valid for
/// `durable.read_url_ttl` from `now_ms`.
pub fn read_url(config: &Config, location: &str, name: &str, now_ms: u64) -> Option<String> {
    let expires = now_ms / 1000 + config.durable.read_url_ttl.as_secs();
    let sig = signature(config, name, expires)?;
    Some(format!("{location}?expires={expires}&sig={sig}"))
}

/// Whether `query` carries a valid, unexpired signature for reading `name`.
pub fn signed_read(config: &Config, query: &str, name: &str, now_ms: u64) -> bool {
    let (Some(expires), Some(sig)) = (query_param(query, "expires"), query_param(query, "sig"))
    else {
        return false;
    };
    let Ok(expires) = expires.parse::<u64>() else {
        return false;
    };
    if expires.saturating_mul(1000) <= now_ms {
        return false;
    }
    match signature(config, name, expires) {
        Some(want) => same(Some(&want), &sig),
        None => false,
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Read,
    Write,
}

/// Refuses the request with `401` unless its credential allows `need`.
pub fn check(config: &DurableConfig, headers: &HeaderMap, need: Need) -> Result<(), DsError> {
    let anonymous = match need {
        Need::Read => config.anonymous_reads,
        Need::Write => config.anonymous_writes,
    };
    if anonymous {
        return Ok(());
    }
    let Some(given) = bearer(headers) else {
        return Err(DsError::Unauthorized);
    };
    let write = config.write_token.as_ref().map(|s| s.expose());
    let read = config.read_token.as_ref().map(|s| s.expose());
    let allowed = match need {
        Need::Write => same(write, given),
        Need::Read => same(write, given) || same(read, given),
    };
    if allowed {
        Ok(())
    } else {
        Err(DsError::Unauthorized)
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares digests, so that the time taken says nothing about the token.
fn same(expected: Option<&str>, given: &str) -> bool {
    match expected {
        Some(e) if !e.is_empty() => {
            Sha256::digest(e.as_bytes()) == Sha256::digest(given.as_bytes())
        }
        _ => false,
    }
}
