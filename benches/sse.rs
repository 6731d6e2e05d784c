//! SSE parser and encoder throughput: the per-token cost every relayed
//! upstream body pays, on OpenAI-style chat completion chunks.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reprise_core::sse::{encode_fields, Event, Limits, Parser};

/// About 1 MB of body, as an upstream would send it.
const BODY_LEN: usize = 1 << 20;
/// Typical size of a body chunk read from an upstream connection.
const NETWORK_CHUNK: usize = 1536;

/// `data: {...chat.completion.chunk...}\n\n` events of ~150 bytes until `BODY_LEN`.
fn chat_body() -> Bytes {
    const TOKENS: [&str; 8] = [
        "Hello", ",", " world", "!", " The", " answer", " is", " 42.\\n",
    ];
    let mut body = Vec::with_capacity(BODY_LEN + 256);
    let mut n = 0usize;
    while body.len() < BODY_LEN {
        let token = TOKENS[n % TOKENS.len()];
        let event = format!(
            "data: {{\"id\":\"chatcmpl-9xQ7bR2vLmK4Zt\",\"object\":\"chat.completion.chunk\",\
             \"created\":1718000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"delta\":{{\"content\":\"{token}\"}}}}]}}\n\n"
        );
        body.extend_from_slice(event.as_bytes());
        n += 1;
    }
    Bytes::from(body)
}

/// Parse `body` delivered in `chunk`-byte pieces; returns the event count.
fn parse(body: &Bytes, chunk: usize) -> usize {
    let mut parser = Parser::new(Limits::default());
    let mut events = 0;
    let mut start = 0;
    while start < body.len() {
        let end = (start + chunk).min(body.len());
        parser.push(body.slice(start..end));
        start = end;
        while let Ok(Some(event)) = parser.next_event() {
            black_box(&event);
            events += 1;
        }
    }
    events
}

fn bench_parse(c: &mut Criterion) {
    let body = chat_body();
    let expected = parse(&body, body.len());
    let mut group = c.benchmark_group("sse_parse");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("chat_1.5KiB_chunks", |b| {
        b.iter(|| assert_eq!(parse(black_box(&body), NETWORK_CHUNK), expected))
    });
    group.bench_function("chat_1B_chunks", |b| {
        b.iter(|| assert_eq!(parse(black_box(&body), 1), expected))
    });
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let body = chat_body();
    let mut parser = Parser::new(Limits::default());
    parser.push(body);
    let events: Vec<Event> = std::iter::from_fn(|| parser.next_event().ok().flatten()).collect();
    let mut out = BytesMut::new();
    for event in &events {
        encode_fields(event, &mut out);
    }
    let mut group = c.benchmark_group("sse_encode");
    group.throughput(Throughput::Bytes(out.len() as u64));
    group.bench_function("chat_events", |b| {
        b.iter(|| {
            out.clear();
            for event in black_box(&events) {
                encode_fields(event, &mut out);
            }
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench_parse, bench_encode);
criterion_main!(benches);
