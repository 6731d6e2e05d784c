//! The Redis function library Reprise loads (`library.lua`): its name,
//! the functions the store calls, and the marks its refusals carry.

/// Name of the Redis function library this version of Reprise loads. The
/// version suffix lets instances of two Reprise versions share one Redis
/// during a rolling upgrade.
///
/// Version 2: gap entries (field `g`, counted in the metadata's `gaps`).
/// Version 3: producer leases, cancel requests, ending abandoned streams.
/// Version 4: packed entries (field `p`, several events per Redis stream
/// entry), which version 3 readers cannot decode.
/// Version 6: the terminal entry at the largest stream id (field `f`), and
/// `append_at` (appends that detect a store which lost the stream).
pub const LIBRARY_NAME: &str = "reprise_store_6";

pub(super) const FN_APPEND: &str = "reprise_store_6_append";
pub(super) const FN_APPEND_AT: &str = "reprise_store_6_append_at";
pub(super) const FN_NOTE_BINDING: &str = "reprise_store_6_note_binding";
pub(super) const FN_END_BINDING: &str = "reprise_store_6_end_binding";
pub(super) const FN_RENEW_LEASE: &str = "reprise_store_6_renew_lease";
pub(super) const FN_REQUEST_CANCEL: &str = "reprise_store_6_request_cancel";
pub(super) const FN_END_IF_ABANDONED: &str = "reprise_store_6_end_if_abandoned";
pub(super) const FN_CHECKED_APPEND: &str = "reprise_store_6_checked_append";
pub(super) const FN_SLIDING_EXPIRY: &str = "reprise_store_6_sliding_expiry";

/// Deletes a key binding (KEYS[1]) only if it still holds ARGV[1], the
/// stream id whose claim is given back.
pub(super) const RELEASE_KEY: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Sets the metadata hash's (KEYS[1]) `signals` field to ARGV[1] only if the
/// hash exists: a plain `HSET` on an expired stream would create a record
/// without a TTL.
pub(super) const SET_SIGNALS: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HSET', KEYS[1], 'signals', ARGV[1]) end return 0";

/// Error prefix the library uses for batches that do not follow the stream.
pub(super) const CONFLICT_MARK: &str = "REPRISE_CONFLICT";

/// Error prefix the library uses when the store lost what a writer appended.
pub(super) const LOST_MARK: &str = "REPRISE_LOST";

/// The library's source: loaded at connect and again whenever a server
/// answers that it is missing (a restart, a new node).
pub(super) const LIBRARY: &str = include_str!("library.lua");
