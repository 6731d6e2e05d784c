//! The tail lookup of a Durable Streams append or `HEAD` (`Store::last_seq`)
//! on long streams: before, the trait's default paged through the whole
//! stream with `read` (O(n)); now each backend answers from its last entry
//! (Redis: one `XREVRANGE … COUNT 1`; embedded: the last entry). Both are
//! measured here on the same stream, interleaved (base, new, base, new), on
//! the embedded store and a private `redis-server` (started on a free port,
//! no persistence).
//!
//! `cargo bench -p reprise-benches --bench tail`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reprise_core::{Epoch, Seq, StreamId};
use reprise_store::{
    Entry, EntryBody, MemoryLimits, MemoryStore, RedisOptions, RedisStore, Store, StoreOptions,
    StreamMeta,
};

#[path = "load/procs.rs"]
#[allow(dead_code)]
mod procs;

/// Stream lengths measured, in events.
const LENGTHS: [u64; 3] = [1_000, 10_000, 100_000];
/// Lookups per measurement round.
const LOOKUPS: u32 = 20;

fn options() -> StoreOptions {
    StoreOptions {
        key_prefix: "bench:".into(),
        retention: Duration::from_secs(60),
        max_stream_duration: Duration::from_secs(600),
    }
}

fn meta(id: StreamId) -> StreamMeta {
    StreamMeta {
        headers: vec![("content-type".into(), "application/json".into())],
        ..StreamMeta::new(id, Epoch::random(), "#durable", "durable", 0)
    }
}

/// The trait's default `last_seq` (what the appends used before).
async fn paging_last_seq(store: &dyn Store, stream: StreamId) -> Seq {
    const PAGE: usize = 1000;
    let mut last = Seq::ZERO;
    loop {
        let page = store.read(stream, last, PAGE).await.expect("read");
        match page.last() {
            Some(e) => last = e.last_seq(),
            None => return last,
        }
        if page.len() < PAGE {
            return last;
        }
    }
}

async fn stream_of(store: &dyn Store, n: u64) -> StreamId {
    let id = StreamId::random();
    store.create(&meta(id)).await.expect("create");
    let entries: Vec<Entry> = (1..=n)
        .map(|s| Entry {
            seq: Seq(s),
            body: EntryBody::Event(Bytes::from(format!(
                "{{\"n\":{s},\"text\":\"token {s:06}\"}}"
            ))),
        })
        .collect();
    for chunk in entries.chunks(128) {
        store.append(id, chunk).await.expect("append");
    }
    id
}

async fn bench_store(name: &str, store: &dyn Store) {
    println!("\n{name}: time per tail lookup (mean of {LOOKUPS}), rounds interleaved");
    println!("| events | base (paging) | new (last entry) | base | new |");
    println!("|---:|---:|---:|---:|---:|");
    for n in LENGTHS {
        let id = stream_of(store, n).await;
        let mut cells = Vec::new();
        for round in 0..4 {
            let start = Instant::now();
            for _ in 0..LOOKUPS {
                let got = if round % 2 == 0 {
                    paging_last_seq(store, id).await
                } else {
                    store.last_seq(id).await.expect("last_seq")
                };
                assert_eq!(got, Seq(n));
            }
            cells.push(format!(
                "{:.1} µs",
                start.elapsed().as_secs_f64() * 1e6 / f64::from(LOOKUPS)
            ));
        }
        println!("| {n} | {} |", cells.join(" | "));
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new(options(), MemoryLimits::default()));
    rt.block_on(bench_store("embedded", &*memory));
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
            rt.block_on(bench_store("redis", &store));
            drop(redis);
        }
        Err(e) => eprintln!("tail/redis skipped: {e}"),
    }
}
