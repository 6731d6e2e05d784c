//! Moving streams: the middle of a request's path, below the handlers and
//! above the relay state's leaves.
//!
//! - [`recorder`]: the producer (upstream body → log), the writer (log →
//!   store) and the producer's lease;
//! - [`reader`]: the response body that sends one client a stream;
//! - [`hub`]: this instance's logs, and loaders that follow the store for
//!   streams produced elsewhere;
//! - [`live`]: one stream's in-memory log, shared by producer and readers;
//! - [`budget`]: the instance-wide bound on what those logs hold.

pub mod budget;
pub mod hub;
pub mod live;
pub mod reader;
pub mod recorder;
