//! Rate limits in Redis (see [`crate::limits`]): counts shared by every
//! relay instance on the same Redis, so a caller's limit holds whichever
//! instance it reaches.
//!
//! Keys, with `P` the key prefix and `<c>` the caller identity in unpadded
//! base64url; the hash tag `{rl:<c>}` puts a caller's keys in one cluster slot:
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `P{rl:<c>}:c` | sorted set | open slots: member = slot id, score = expiry (ms, Redis clock) |
//! | `P{rl:<c>}:s` | sorted set | starts of the last minute: member = slot id, score = when (ms) |
//!
//! Each check is one `EVAL` of [`ACQUIRE`] (atomic: no two instances can
//! both take the last slot); a refresh one `EVAL` of [`REFRESH`]; a release
//! one `ZREM`. Both keys expire on their own once idle. Time is the Redis
//! server's (`TIME`), so instances need not agree on clocks. Commands are
//! sent with the store's fail-fast options through its [`Router`], so a
//! check during an outage fails at once (and the relay fails open).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;

use super::codec::{b64, millis};
use super::connection::Inner;
use super::error::map_err;
use super::routing::Cmd;
use crate::limits::{Admission, LimitKind, Limiter, RateLimits, START_WINDOW};
use crate::StoreError;

/// Check both limits and, if under them, count the start and take the slot.
/// KEYS: slots, starts. ARGV: slot id, slot TTL ms, max streams, max starts,
/// window ms. Returns {0} admitted, {1} over the stream limit, or
/// {2, ms until a start frees} over the start limit.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, max_c, max_s, window =
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if max_c > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max_c then return {1} end
end
if max_s > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= max_s then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, tonumber(oldest[2]) + window - now}
  end
end
if max_c > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if max_s > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], window)
end
return {0}
"#;

/// Extend a slot that has not expired. KEYS: slots. ARGV: slot id, TTL ms.
const REFRESH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[1])
if until_ms and tonumber(until_ms) > now then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 0
"#;

/// The slots and starts keys of `caller` (see the module docs).
fn limit_keys(prefix: &str, caller: &str) -> (String, String) {
    let base = format!("{prefix}{{rl:{}}}", b64(caller));
    (format!("{base}:c"), format!("{base}:s"))
}

/// The Redis [`Limiter`], sharing the store's connections.
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

impl RedisLimiter {
    pub(super) fn new(inner: Arc<Inner>) -> RedisLimiter {
        RedisLimiter { inner }
    }

    fn keys(&self, caller: &str) -> (String, String) {
        limit_keys(&self.inner.opts.key_prefix, caller)
    }

    fn ready(&self) -> Result<(), StoreError> {
        if self.inner.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Unavailable("not connected to Redis yet".into()))
        }
    }

    async fn eval(
        &self,
        script: &str,
        keys: &[&str],
        args: Vec<Value>,
    ) -> Result<Value, StoreError> {
        let Some(first) = keys.first() else {
            return Err(StoreError::Corrupt("EVAL without keys".into()));
        };
        let mut full: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
        full.push(script.into());
        full.push(Value::Integer(keys.len() as i64));
        full.extend(keys.iter().map(|k| Value::from(*k)));
        full.extend(args);
        let mut replies = self
            .inner
            .router
            .run(&self.inner.write_opts, first, &[Cmd::new("EVAL", full)])
            .await
            .map_err(map_err)?;
        Ok(replies.pop().unwrap_or(Value::Null))
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn acquire(
        &self,
        caller: &str,
        slot: &str,
        limits: RateLimits,
        slot_ttl: Duration,
    ) -> Result<Admission, StoreError> {
        if limits.is_unlimited() {
            return Ok(Admission::Admitted);
        }
        self.ready()?;
        let (slots, starts) = self.keys(caller);
        let args: Vec<Value> = vec![
            slot.into(),
            millis(slot_ttl).into(),
            i64::from(limits.max_streams).into(),
            i64::from(limits.max_starts_per_minute).into(),
            millis(START_WINDOW).into(),
        ];
        let reply = self.eval(ACQUIRE, &[&slots, &starts], args).await?;
        let parts = match reply {
            Value::Array(parts) => parts,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "rate limit check answered {:?}",
                    other.kind()
                )))
            }
        };
        let code = parts.first().and_then(Value::as_i64);
        match code {
            Some(0) => Ok(Admission::Admitted),
            Some(1) => Ok(Admission::Refused {
                limit: LimitKind::Concurrent,
                retry_after: None,
            }),
            Some(2) => {
                let wait = parts.get(1).and_then(Value::as_i64).unwrap_or(0).max(0);
                Ok(Admission::Refused {
                    limit: LimitKind::StartsPerMinute,
                    retry_after: Some(Duration::from_millis(wait as u64)),
                })
            }
            _ => Err(StoreError::Corrupt(
                "rate limit check answered an unknown code".into(),
            )),
        }
    }

    async fn refresh(
        &self,
        caller: &str,
        slot: &str,
        slot_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.ready()?;
        let (slots, _) = self.keys(caller);
        let args: Vec<Value> = vec![slot.into(), millis(slot_ttl).into()];
        self.eval(REFRESH, &[&slots], args).await.map(|_| ())
    }

    async fn release(&self, caller: &str, slot: &str) -> Result<(), StoreError> {
        self.ready()?;
        let (slots, _) = self.keys(caller);
        self.inner
            .router
            .run(
                &self.inner.write_opts,
                &slots,
                &[Cmd::new("ZREM", vec![slots.as_str().into(), slot.into()])],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::limit_keys;

    /// The text between the first `{` and the next `}`: what Redis hashes.
    fn tag(k: &str) -> &str {
        let open = k.find('{').expect("a hash tag");
        let close = k[open..].find('}').expect("a closed hash tag") + open;
        &k[open + 1..close]
    }

    #[test]
    fn a_callers_keys_share_one_hash_tag_that_braces_cannot_break() {
        let (c, s) = limit_keys("reprise:", "/api/{x}#ip:1.2.3.4");
        assert_eq!(tag(&c), tag(&s));
        assert!(c.starts_with("reprise:{rl:") && c.ends_with("}:c"));
        assert!(s.ends_with("}:s"));
        assert!(!tag(&c)[3..].contains(['{', '}', '#', ':']));
        let (other, _) = limit_keys("reprise:", "/api/{x}#ip:1.2.3.5");
        assert_ne!(tag(&c), tag(&other));
    }
}
