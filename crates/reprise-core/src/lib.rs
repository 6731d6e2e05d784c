//! Pure core of Reprise: everything about a stream that needs no I/O.
//!
//! - [`ids`]: stream ids, event ids and the cursor a resume starts from.
//! - [`sse`]: the Server-Sent Events parser (HTML standard semantics) and encoder.
//! - [`ndjson`]: the line splitter for newline-delimited JSON streams (Ollama).
//! - [`format`]: which of the two framings a stream uses.
//! - [`outcome`]: how a stream ended (completed, failed, cancelled) and the in-band signals readers get.
//! - [`dialect`]: how those signals are spelled so that each client's SDK raises on them.
//! - [`wire`]: how an event or a signal becomes the bytes a client reads, with its id.
#![forbid(unsafe_code)]

pub mod dialect;
pub mod format;
pub mod ids;
pub mod ndjson;
pub mod outcome;
pub mod sse;
pub mod wire;

pub use dialect::Dialect;
pub use format::Format;
pub use ids::{Cursor, Epoch, EventId, IdError, IdPrefix, Seq, StreamId};
pub use outcome::{FailReason, Outcome};
pub use wire::{Span, WireEncoder};
