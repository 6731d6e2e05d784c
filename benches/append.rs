//! Store append batching: the cost per event of appending a stream's events
//! one per call, 16 per call and 128 per call, to the embedded store and to
//! a private `redis-server` (started here on a free port, no persistence).
//! The relay's store writer gathers events (`streams.store_linger`) so that
//! one append carries many; this shows what that buys.
//!
//! `cargo bench -p reprise-benches --bench append`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use reprise_core::{Epoch, Outcome, Seq, StreamId};
use reprise_store::{
    Entry, EntryBody, MemoryLimits, MemoryStore, RedisOptions, RedisStore, Store, StoreOptions,
    StreamMeta,
};

#[path = "load/procs.rs"]
#[allow(dead_code)]
mod procs;

/// Events appended per measured stream.
const EVENTS: u64 = 1024;
/// Events per append call.
const BATCHES: [u64; 3] = [1, 16, 128];

fn options() -> StoreOptions {
    StoreOptions {
        key_prefix: "bench:".into(),
        retention: Duration::from_secs(2),
        max_stream_duration: Duration::from_secs(600),
    }
}

fn meta(id: StreamId) -> StreamMeta {
    StreamMeta {
        headers: vec![("content-type".into(), "text/event-stream".into())],
        ..StreamMeta::new(id, Epoch::random(), "/api/chat", "sse", 0)
    }
}

/// A ~100-byte event, as a chat token delta encodes.
fn event(seq: u64) -> Entry {
    Entry {
        seq: Seq(seq),
        body: EntryBody::Event(Bytes::from(format!(
            "data: {{\"type\":\"text-delta\",\"id\":\"msg-1\",\"delta\":\"token {seq:06} of the answer\"}}"
        ))),
    }
}

/// Appends `EVENTS` events to a fresh stream, `batch` per call; returns the
/// time the appends took (stream creation excluded).
async fn one_stream(store: &dyn Store, batch: u64) -> Duration {
    let id = StreamId::random();
    store.create(&meta(id)).await.expect("create");
    let entries: Vec<Entry> = (1..=EVENTS).map(event).collect();
    let start = Instant::now();
    for chunk in entries.chunks(batch as usize) {
        store.append(id, chunk).await.expect("append");
    }
    let took = start.elapsed();
    // Ended (untimed), so that finished streams leave the live budget and
    // expire after the retention.
    let end = Entry {
        seq: Seq(EVENTS + 1),
        body: EntryBody::End(Outcome::Completed),
    };
    store.append(id, &[end]).await.expect("end");
    took
}

fn bench_store(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, store: Arc<dyn Store>) {
    let mut g = c.benchmark_group(format!("append/{name}"));
    g.throughput(Throughput::Elements(EVENTS));
    g.sample_size(20);
    for batch in BATCHES {
        g.bench_with_input(
            BenchmarkId::new("events_per_call", batch),
            &batch,
            |b, &batch| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += one_stream(&*store, batch).await;
                        }
                        total
                    })
                })
            },
        );
    }
    g.finish();
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new(options(), MemoryLimits::default()));
    bench_store(c, &rt, "embedded", memory);

    let dir = tempfile::tempdir().expect("temp dir");
    match procs::Redis::start(dir.path()) {
        Ok(redis) => {
            let url = format!("redis://{}", redis.addr);
            let store = rt
                .block_on(RedisStore::connect_with(
                    &url,
                    options(),
                    RedisOptions::default(),
                ))
                .expect("connect to the private redis-server");
            bench_store(c, &rt, "redis", Arc::new(store));
            drop(redis);
        }
        Err(e) => eprintln!("append/redis skipped: {e}"),
    }
}

criterion_group!(benches, append);
criterion_main!(benches);
