//! The HTTP relay.
#![forbid(unsafe_code)]
