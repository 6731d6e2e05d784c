//! Which route a request belongs to, and where its upstream request goes.
//!
//! Routes are path prefixes matched on segment boundaries (`/api/chat`
//! matches `/api/chat` and `/api/chat/x`, not `/api/chatty`); the longest
//! prefix wins. A route's `resume` template (`/api/chat/{key}/stream`) is
//! matched before prefixes, for GET and DELETE only; its `stop` template
//! (`/api/chat/{key}/stop`) for POST only.

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use percent_encoding::percent_decode_str;

use crate::config::{
    normalize_prefix, CallerConfig, KeySource, ResumeAuth, RouteConfig, RouteLimits, Signals,
};

/// A configured route, ready for matching.
#[derive(Debug)]
pub struct Route {
    /// The configured path, normalized (no trailing slash except for "/").
    pub path: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Upstream path that replaces the route prefix; `None` keeps the request path.
    pub base_path: Option<String>,
    pub key: Option<KeySource>,
    pub resume: Option<ResumeTemplate>,
    /// `POST` here cancels the key's latest stream.
    pub stop: Option<ResumeTemplate>,
    pub record: bool,
    pub caller: CallerConfig,
    pub resume_auth: ResumeAuth,
    /// Rate limits overriding `[limits]` (see `ratelimit::limits_for`).
    pub limits: RouteLimits,
    /// The dialect of in-band signals (see `reprise_core::dialect`).
    pub signals: Signals,
}

/// `prefix{key}suffix`.
#[derive(Debug)]
pub struct ResumeTemplate {
    prefix: String,
    suffix: String,
}

impl ResumeTemplate {
    fn parse(t: &str) -> Option<Self> {
        let (prefix, suffix) = t.split_once("{key}")?;
        Some(ResumeTemplate {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    /// The percent-decoded key if `path` matches the template. The key is one
    /// non-empty path segment.
    pub fn match_path(&self, path: &str) -> Option<String> {
        let rest = path.strip_prefix(&self.prefix)?;
        let raw = rest.strip_suffix(&self.suffix)?;
        if raw.is_empty() || raw.contains('/') {
            return None;
        }
        let key = percent_decode_str(raw).decode_utf8().ok()?;
        Some(key.into_owned())
    }
}

/// All routes, longest prefix first.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

/// Why a route's config could not be turned into a [`Route`] (validated
/// configs never fail here).
#[derive(Debug, thiserror::Error)]
#[error("route {path}: {reason}")]
pub struct RouteError {
    path: String,
    reason: String,
}

impl Router {
    pub fn new(configs: &[RouteConfig]) -> Result<Router, RouteError> {
        let mut routes = Vec::with_capacity(configs.len());
        for c in configs {
            let err = |reason: &str| RouteError {
                path: c.path.clone(),
                reason: reason.to_string(),
            };
            let uri: Uri = c
                .upstream
                .parse()
                .map_err(|_| err("invalid upstream URL"))?;
            let parts = uri.into_parts();
            let scheme = parts
                .scheme
                .ok_or_else(|| err("upstream URL has no scheme"))?;
            let authority = parts
                .authority
                .ok_or_else(|| err("upstream URL has no host"))?;
            let base_path = parts
                .path_and_query
                .map(|p| p.path().trim_end_matches('/').to_string())
                .filter(|p| !p.is_empty());
            let resume = match &c.resume {
                Some(t) => {
                    Some(ResumeTemplate::parse(t).ok_or_else(|| err("resume has no {key}"))?)
                }
                None => None,
            };
            let stop = match &c.stop {
                Some(t) => Some(ResumeTemplate::parse(t).ok_or_else(|| err("stop has no {key}"))?),
                None => None,
            };
            routes.push(Arc::new(Route {
                path: normalize_prefix(&c.path).to_string(),
                scheme,
                authority,
                base_path,
                key: c.key.clone(),
                resume,
                stop,
                record: c.record,
                caller: c.caller.clone(),
                resume_auth: c.resume_auth,
                limits: c.limits,
                signals: c.signals,
            }));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        Ok(Router { routes })
    }

    /// The route whose prefix matches `path`.
    pub fn match_path(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| prefix_matches(&r.path, path))
    }

    /// The route configured with exactly this path (a stream's `route`).
    pub fn by_path(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.path == path)
    }

    /// The route whose resume template matches `path`, with the key.
    pub fn match_resume(&self, path: &str) -> Option<(&Arc<Route>, String)> {
        self.routes
            .iter()
            .find_map(|r| Some((r, r.resume.as_ref()?.match_path(path)?)))
    }

    /// The route whose stop template matches `path`, with the key.
    pub fn match_stop(&self, path: &str) -> Option<(&Arc<Route>, String)> {
        self.routes
            .iter()
            .find_map(|r| Some((r, r.stop.as_ref()?.match_path(path)?)))
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// True if the path has `.` or `..` segments, raw or percent-encoded, or an
/// encoded slash: such paths could escape a route's prefix upstream, so the
/// relay refuses them.
pub fn is_unsafe_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return true;
    }
    lower.split('/').any(|seg| {
        let decoded = seg.replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

impl Route {
    /// The upstream URI for a request's path and query.
    pub fn upstream_uri(&self, pq: &PathAndQuery) -> Result<Uri, http::Error> {
        let path = pq.path();
        let target = match &self.base_path {
            None => pq.as_str().to_string(),
            Some(base) => {
                let rest = if self.path == "/" {
                    path
                } else {
                    path.strip_prefix(self.path.as_str()).unwrap_or(path)
                };
                let mut t = format!("{base}{rest}");
                if t.is_empty() {
                    t.push('/');
                }
                if let Some(q) = pq.query() {
                    t.push('?');
                    t.push_str(q);
                }
                t
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(target)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, upstream: &str, resume: Option<&str>) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            upstream: upstream.into(),
            key: resume.map(|_| KeySource::Json("/id".into())),
            resume: resume.map(String::from),
            stop: None,
            record: true,
            caller: Default::default(),
            resume_auth: Default::default(),
            ca_file: None,
            limits: Default::default(),
            signals: Default::default(),
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let r = Router::new(&[
            route("/", "http://a", None),
            route("/api/chat", "http://b", None),
            route("/api/chat/special/", "http://c", None),
        ])
        .unwrap();
        let host = |p: &str| r.match_path(p).unwrap().authority.to_string();
        assert_eq!(host("/api/chat"), "b");
        assert_eq!(host("/api/chat/x"), "b");
        assert_eq!(host("/api/chatty"), "a");
        assert_eq!(host("/api/chat/special"), "c");
        assert_eq!(host("/other"), "a");
        let none = Router::new(&[route("/v1", "http://a", None)]).unwrap();
        assert!(none.match_path("/v2").is_none());
    }

    #[test]
    fn upstream_paths() {
        let pq = |s: &str| s.parse::<PathAndQuery>().unwrap();
        let r = Router::new(&[route("/api/chat", "http://127.0.0.1:3000", None)]).unwrap();
        let u = r
            .match_path("/api/chat")
            .unwrap()
            .upstream_uri(&pq("/api/chat?x=1"))
            .unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:3000/api/chat?x=1");

        let r = Router::new(&[route("/openai", "https://api.openai.com/v1/", None)]).unwrap();
        let route = r.match_path("/openai/chat/completions").unwrap();
        let u = route
            .upstream_uri(&pq("/openai/chat/completions?a=b"))
            .unwrap();
        assert_eq!(
            u.to_string(),
            "https://api.openai.com/v1/chat/completions?a=b"
        );
        assert_eq!(
            route.upstream_uri(&pq("/openai")).unwrap().to_string(),
            "https://api.openai.com/v1"
        );
    }

    #[test]
    fn resume_templates() {
        let r = Router::new(&[route(
            "/api/chat",
            "http://a",
            Some("/api/chat/{key}/stream"),
        )])
        .unwrap();
        let (_, key) = r.match_resume("/api/chat/abc/stream").unwrap();
        assert_eq!(key, "abc");
        let (_, key) = r.match_resume("/api/chat/a%20b%2Fc/stream").unwrap();
        assert_eq!(key, "a b/c");
        assert!(r.match_resume("/api/chat//stream").is_none());
        assert!(r.match_resume("/api/chat/a/b/stream").is_none());
        assert!(r.match_resume("/api/chat/abc").is_none());
    }

    #[test]
    fn unsafe_paths() {
        for p in [
            "/a/../b",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/./b",
            "/..",
            "/a%2fb",
            "/a\\b",
        ] {
            assert!(is_unsafe_path(p), "{p}");
        }
        for p in ["/a/b", "/a/..b/c", "/a/b.c", "/"] {
            assert!(!is_unsafe_path(p), "{p}");
        }
    }
}
