//! Who may resume by key and cancel: the caller identity.
//!
//! Resuming by stream id or `Last-Event-ID` is capability-based (the id is
//! unguessable). Resuming by key (chat ids are often guessable) and
//! cancelling require the same caller as the request that started the
//! stream. A route names what identifies its callers (`routes[].caller`,
//! default: the `Authorization` and `Cookie` headers); Reprise keeps only
//! an HMAC-SHA256 of those values under `auth.secret`, never the values.
//! A mismatch is answered exactly like "no such stream".

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

use crate::config::{CallerConfig, Secret};

type HmacSha256 = Hmac<Sha256>;

/// The key used when no `auth.secret` is configured.
const DEFAULT_SECRET: &[u8] = b"reprise: no auth.secret configured";

/// Computes caller identities.
pub struct Auth {
    secret: Vec<u8>,
}

impl Auth {
    /// With no configured secret, a built-in key, so that instances agree
    /// out of the box; identities are then only as strong as the
    /// credentials' own entropy, hence the warning.
    pub fn new(secret: Option<&Secret>) -> Auth {
        match secret {
            Some(s) => Auth {
                secret: s.expose().as_bytes().to_vec(),
            },
            None => {
                tracing::warn!(
                    "auth.secret (or REPRISE_AUTH_SECRET) is not set: caller identities are hashed with a built-in key; \
                     set a secret, the same on every instance"
                );
                Auth {
                    secret: DEFAULT_SECRET.to_vec(),
                }
            }
        }
    }

    /// The caller identity of a request on `route` (hex HMAC of the values
    /// that identify callers there). Requests without any of them share
    /// one anonymous identity per route.
    pub fn caller(&self, route: &str, who: &CallerConfig, headers: &HeaderMap) -> String {
        let mut mac = match HmacSha256::new_from_slice(&self.secret) {
            Ok(m) => m,
            // HMAC accepts keys of any length; unreachable in practice.
            Err(_) => return String::new(),
        };
        mac.update(route.as_bytes());
        mac.update(b"\0");
        for name in &who.headers {
            mac.update(name.to_ascii_lowercase().as_bytes());
            mac.update(b"=");
            for v in headers.get_all(name.as_str()) {
                mac.update(v.as_bytes());
                mac.update(b"\x1f");
            }
            mac.update(b"\0");
        }
        for cookie in &who.cookies {
            mac.update(b"cookie:");
            mac.update(cookie.as_bytes());
            mac.update(b"=");
            if let Some(v) = cookie_value(headers, cookie) {
                mac.update(v.as_bytes());
            }
            mac.update(b"\0");
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Whether a request carries any of the values that identify callers on a
/// route (`who`). Without them, every request shares the route's anonymous
/// identity, and rate limits count by client address instead.
pub fn identifies(who: &CallerConfig, headers: &HeaderMap) -> bool {
    who.headers.iter().any(|h| headers.contains_key(h.as_str()))
        || who
            .cookies
            .iter()
            .any(|name| cookie_value(headers, name).is_some())
}

/// The value of one cookie in the request's `Cookie` headers.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Whether the request's caller is the one that started a stream (`owner`).
/// Streams recorded without a caller identity match everyone.
/// `router` tells how the stream's route identifies callers.
pub fn is_owner(
    auth: &Auth,
    router: &crate::routes::Router,
    owner: &crate::stream::live::Owner,
    headers: &HeaderMap,
) -> bool {
    let Some(stored) = &owner.caller else {
        return true;
    };
    let default = CallerConfig::default();
    let who = router
        .by_path(&owner.route)
        .map(|r| &r.caller)
        .unwrap_or(&default);
    same_caller(stored, &auth.caller(&owner.route, who, headers))
}

/// Constant-time comparison of two caller identities.
pub fn same_caller(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn callers_differ_by_credentials_route_and_secret() {
        let auth = Auth::new(Some(&Secret::new("s1")));
        let who = CallerConfig::default();
        let alice = auth.caller("/api/chat", &who, &h(&[("authorization", "Bearer alice")]));
        let alice2 = auth.caller(
            "/api/chat",
            &who,
            &h(&[("Authorization", "Bearer alice"), ("x-other", "1")]),
        );
        let bob = auth.caller("/api/chat", &who, &h(&[("authorization", "Bearer bob")]));
        assert!(same_caller(&alice, &alice2));
        assert!(!same_caller(&alice, &bob));
        assert_ne!(
            alice,
            auth.caller("/other", &who, &h(&[("authorization", "Bearer alice")]))
        );
        let other_secret = Auth::new(Some(&Secret::new("s2")));
        assert_ne!(
            alice,
            other_secret.caller("/api/chat", &who, &h(&[("authorization", "Bearer alice")]))
        );
        // Never the credential itself.
        assert!(!alice.contains("alice"));
    }

    #[test]
    fn requests_without_credentials_are_anonymous() {
        let default = CallerConfig::default();
        assert!(identifies(&default, &h(&[("authorization", "Bearer x")])));
        assert!(identifies(&default, &h(&[("cookie", "a=b")])));
        assert!(!identifies(&default, &h(&[("x-other", "1")])));
        let by_cookie = CallerConfig {
            headers: vec![],
            cookies: vec!["session".into()],
        };
        assert!(identifies(
            &by_cookie,
            &h(&[("cookie", "theme=1; session=abc")])
        ));
        assert!(!identifies(&by_cookie, &h(&[("cookie", "theme=1")])));
    }

    #[test]
    fn named_cookies_identify_callers() {
        let auth = Auth::new(Some(&Secret::new("s")));
        let who = CallerConfig {
            headers: vec![],
            cookies: vec!["session".into()],
        };
        let a = auth.caller("/", &who, &h(&[("cookie", "theme=dark; session=abc")]));
        let b = auth.caller("/", &who, &h(&[("cookie", "session=abc; theme=light")]));
        let c = auth.caller("/", &who, &h(&[("cookie", "session=xyz")]));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
