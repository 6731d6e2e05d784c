//! Route keys as bound in the store (a chat id, an `Idempotency-Key`):
//! taken from a request and namespaced by route and caller.

use http::HeaderMap;
use reprise_store::KeyRef;

use crate::routes::Route;
use crate::state::Relay;

/// Longest key value (chat id) accepted for a key binding.
pub(crate) const MAX_KEY_LEN: usize = 512;

/// A route key as bound in the store: namespaced by route and caller, so
/// that keys of different routes or callers never collide, and another
/// caller's key resolves to nothing.
pub(crate) fn route_key(relay: &Relay, route: &Route, headers: &HeaderMap, key: String) -> KeyRef {
    let caller = relay.auth.caller(&route.path, &route.caller, headers);
    KeyRef {
        route: format!("{}#{caller}", route.path),
        key,
    }
}

/// The `Idempotency-Key` of a request, namespaced by route and caller.
pub(crate) fn idempotency_key(relay: &Relay, route: &Route, headers: &HeaderMap) -> Option<KeyRef> {
    let v = headers.get("idempotency-key")?.to_str().ok()?.trim();
    if v.is_empty() || v.len() > MAX_KEY_LEN {
        return None;
    }
    let mut k = route_key(relay, route, headers, v.to_string());
    k.route = format!("idempotency:{}", k.route);
    Some(k)
}
