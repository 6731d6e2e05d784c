//! The HTTP relay: a reverse proxy that records SSE responses into the store
//! and serves resumes.
//!
//! Where a request goes, in order:
//! - [`server`]: accepts connections, owns shared state and shutdown;
//! - [`proxy`]: dispatches each request (own endpoints, resume, forward);
//! - [`routes`]: matches a path to a route and builds the upstream URI;
//! - [`upstream`]: the HTTP(S) client and reverse-proxy header rules;
//! - [`tls`]: certificates and trusted roots (listener, upstreams, Redis);
//! - [`recorder`]: producer (upstream body → log) and writer (log → store);
//! - [`decode`]: gzip, deflate and br upstream bodies, decoded for the recorder;
//! - [`live`]: one stream's in-memory log, shared by producer and readers;
//! - [`hub`]: this instance's logs, and loaders that follow the store;
//! - [`reader`]: the response body that sends a client a stream;
//! - [`resume`]: what a reconnecting client gets (200, 204, 404, history lost);
//! - [`admin`]: `/_reprise/...` endpoints, and the admin listener;
//! - [`health`]: the store probe; readiness and outage shortcuts read it;
//! - [`auth`]: caller identities for key resumes, cancels and `same-caller`;
//! - [`forwarded`]: trusted proxies, the client's address, `X-Forwarded-*`;
//! - [`ratelimit`]: streams and starts per caller (`429`);
//! - [`cancel`]: `DELETE`: stop a stream's generation from any instance;
//! - [`metrics`]: Prometheus metrics and the instrumented store.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod cancel;
pub mod config;
pub mod decode;
pub mod error;
pub mod forwarded;
pub mod health;
pub mod hub;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod reader;
pub mod recorder;
pub mod resume;
pub mod retry;
pub mod routes;
pub mod server;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{
    open_store, run, run_listeners, serve, serve_listeners, Listeners, Relay, StartError,
};
