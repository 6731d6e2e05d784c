//! Event-id encoding: the `id:` line every forwarded event carries. The
//! `format!` spelling is the baseline the hot path used to pay per event;
//! `WireEncoder::event` is the whole frame the relay writes per event.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use reprise_core::{Epoch, EventId, Format, IdPrefix, Seq, StreamId, WireEncoder};

fn ids(c: &mut Criterion) {
    let stream = StreamId::random();
    let epoch = Epoch::random();
    let mut g = c.benchmark_group("event_id");
    let mut seq = 0u64;
    g.bench_function("format!", |b| {
        b.iter(|| {
            seq += 1;
            black_box(format!("{}.{:08x}.{:010}", black_box(stream), epoch.0, seq))
        })
    });
    g.bench_function("to_string", |b| {
        b.iter(|| {
            seq += 1;
            let id = EventId {
                stream: black_box(stream),
                epoch,
                seq: Seq(seq),
            };
            black_box(id.to_string())
        })
    });
    let mut out = Vec::with_capacity(64);
    g.bench_function("EventId::put", |b| {
        b.iter(|| {
            seq += 1;
            out.clear();
            EventId {
                stream: black_box(stream),
                epoch,
                seq: Seq(seq),
            }
            .put(&mut out);
            black_box(&out);
        })
    });
    // What the relay does: the stream's prefix is encoded once.
    let prefix = IdPrefix::new(stream, epoch);
    g.bench_function("IdPrefix::put (per event)", |b| {
        b.iter(|| {
            seq += 1;
            out.clear();
            black_box(&prefix).put(Seq(seq), &mut out);
            black_box(&out);
        })
    });
    // The whole frame, as the producer's batch writes it: `id:` line,
    // fields, blank line, into one buffer shared by the events of a read.
    let wire = WireEncoder::new(stream, epoch, Format::Sse);
    let mut buf = BytesMut::with_capacity(4096);
    g.bench_function("WireEncoder::event (frame, per event)", |b| {
        b.iter(|| {
            seq += 1;
            if buf.len() > 3072 {
                buf.clear();
            }
            black_box(black_box(&wire).event(Seq(seq), b"data: {\"x\":1}\n", &mut buf));
        })
    });
    g.finish();
}

criterion_group!(benches, ids);
criterion_main!(benches);
