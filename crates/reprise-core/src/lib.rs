//! Pure core of Reprise: everything about a stream that needs no I/O.
//!
//! - [`ids`]: stream ids, event ids and the cursor a resume starts from.
//! - [`sse`]: the Server-Sent Events parser (HTML standard semantics) and encoder.
//! - [`outcome`]: how a stream ended (completed, failed, cancelled) and the in-band signals readers get.
#![forbid(unsafe_code)]

pub mod ids;
pub mod outcome;
pub mod sse;

pub use ids::{Cursor, Epoch, EventId, IdError, Seq, StreamId};
pub use outcome::{FailReason, Outcome};
