//! Who may read and write Durable Streams: bearer tokens from `[durable]`
//! (`write_token`, `read_token`), unless anonymous access is configured.
//! Consulted by the handlers before they touch the store.

use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::error::DsError;
use crate::config::DurableConfig;

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
