//! Writer checks made atomically with an append ([`Store::append_checked`]):
//! Durable Streams' idempotent producers (`Producer-Id`, `Producer-Epoch`,
//! `Producer-Seq`) and writer sequence (`Stream-Seq`), and the state they
//! keep per stream. The embedded store keeps a [`Writers`] next to each
//! stream; Redis keeps the same fields in a hash in the stream's slot
//! (`library.lua`, `checked_append`), with the same rules.
//!
//! [`Store::append_checked`]: crate::Store::append_checked

use std::collections::HashMap;

/// An idempotent producer's claim on one append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerClaim {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

/// What an append must satisfy to be written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterChecks {
    pub producer: Option<ProducerClaim>,
    /// `Stream-Seq`: must sort (bytewise) after the last one given.
    pub stream_seq: Option<String>,
}

/// What [`Store::append_checked`](crate::Store::append_checked) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// The entries are stored.
    Appended,
    /// The producer's seq was accepted before (a retry): nothing written.
    /// `last_seq` is its highest accepted seq; `closed` when the stream is
    /// closed (by this very claim).
    Duplicate { last_seq: u64, closed: bool },
    /// The producer's epoch is older than the one recorded (a zombie).
    StaleEpoch { current: u64 },
    /// A new epoch must start at seq 0.
    NewEpochNeedsSeqZero,
    /// Seqs were skipped.
    SeqGap { expected: u64, received: u64 },
    /// `Stream-Seq` does not sort after the last one.
    StreamSeqRegressed,
    /// The stream is ended, and this is not a retry of the claim that
    /// ended it: nothing written.
    Ended,
}

/// A producer's recorded state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerState {
    pub epoch: u64,
    pub last_seq: u64,
}

/// Per-stream writer state (embedded store).
#[derive(Clone, Debug, Default)]
pub struct Writers {
    pub producers: HashMap<String, ProducerState>,
    pub stream_seq: Option<String>,
    /// The claim whose append ended the stream.
    pub closed_by: Option<ProducerClaim>,
    /// Last access, for a sliding expiry ([`Store::sliding_expiry`](crate::Store::sliding_expiry)).
    pub accessed_ms: Option<u64>,
}

/// The producer rule: `None` if `claim` may append after `state`.
pub fn check_producer(state: Option<ProducerState>, claim: &ProducerClaim) -> Option<Checked> {
    let Some(s) = state else {
        return (claim.seq != 0).then_some(Checked::SeqGap {
            expected: 0,
            received: claim.seq,
        });
    };
    if claim.epoch < s.epoch {
        return Some(Checked::StaleEpoch { current: s.epoch });
    }
    if claim.epoch > s.epoch {
        return (claim.seq != 0).then_some(Checked::NewEpochNeedsSeqZero);
    }
    if claim.seq <= s.last_seq {
        return Some(Checked::Duplicate {
            last_seq: s.last_seq,
            closed: false,
        });
    }
    let expected = s.last_seq + 1;
    (claim.seq != expected).then_some(Checked::SeqGap {
        expected,
        received: claim.seq,
    })
}

impl Writers {
    /// What stops an append with `checks` (`None`: it may be written).
    /// `ended`: the stream has its End entry.
    pub fn check(&self, checks: &WriterChecks, ended: bool) -> Option<Checked> {
        if ended {
            return Some(match (&checks.producer, &self.closed_by) {
                (Some(c), Some(by)) if c == by => Checked::Duplicate {
                    last_seq: c.seq,
                    closed: true,
                },
                _ => Checked::Ended,
            });
        }
        if let Some(c) = &checks.producer {
            if let Some(refusal) = check_producer(self.producers.get(&c.id).copied(), c) {
                return Some(refusal);
            }
        }
        match (&checks.stream_seq, &self.stream_seq) {
            (Some(new), Some(last)) if new.as_bytes() <= last.as_bytes() => {
                Some(Checked::StreamSeqRegressed)
            }
            _ => None,
        }
    }

    /// Records an append that passed [`Writers::check`]; `closing` if it
    /// ended the stream.
    pub fn commit(&mut self, checks: &WriterChecks, closing: bool) {
        if let Some(c) = &checks.producer {
            self.producers.insert(
                c.id.clone(),
                ProducerState {
                    epoch: c.epoch,
                    last_seq: c.seq,
                },
            );
            if closing {
                self.closed_by = Some(c.clone());
            }
        }
        if let Some(s) = &checks.stream_seq {
            self.stream_seq = Some(s.clone());
        }
    }
}
