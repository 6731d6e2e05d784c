//! The HTTP relay: a reverse proxy that records SSE responses into the store
//! and serves resumes.
//!
//! Where a request goes, top-down (no module uses one above it; the
//! `layering` test checks it):
//! - [`server`]: accepts connections (public and admin listeners, TLS) and
//!   runs the shutdown sequence;
//! - [`dispatch`]: decides what a request is: own endpoint, resume, cancel,
//!   or a request to forward;
//! - the handlers: [`durable`] (the Durable Streams server), [`forward`] (upstream, and the start of a recording),
//!   [`resume`] (200, 204, 404, history lost), [`cancel`], [`admin`]
//!   (`/_reprise/...`); with [`idempotency`] and [`keys`] (route keys);
//! - [`stream`]: moving streams: the recorder (producer, writer), readers,
//!   the hub and its loaders, the in-memory live log;
//! - [`state`]: the shared [`Relay`] state and how it is built;
//! - services the state holds: [`auth`] (caller identities),
//!   [`ratelimit`] (`429`), [`health`] (the store probe), [`upstream`]
//!   (the HTTP(S) client and proxy header rules), [`metrics`];
//! - leaves: [`config`], [`routes`], [`forwarded`], [`tls`], [`decode`]
//!   (compressed upstream bodies), [`body`], [`error`], [`retry`],
//!   [`clock`], [`uri`], [`shutdown`] (the phases every task waits on).
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod cancel;
pub mod clock;
pub mod config;
pub mod decode;
pub mod dispatch;
pub mod durable;
pub mod error;
pub mod forward;
pub mod forwarded;
pub mod health;
pub mod idempotency;
pub mod keys;
pub mod metrics;
pub mod ratelimit;
pub mod resume;
pub mod retry;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod uri;

pub use config::Config;
pub use server::{run, run_listeners, serve, serve_listeners, Listeners};
pub use state::{open_store, Relay, StartError};
