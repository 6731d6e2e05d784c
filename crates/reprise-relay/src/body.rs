//! Response and request body types shared by the relay's handlers, and the
//! wrappers around them: joining upstream bursts into one frame
//! ([`Coalesce`]), bounding a forwarded request body ([`Bounded`]) and
//! holding a rate-limit slot while a response streams ([`Holding`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the relay sends or forwards.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A request body forwarded upstream, cut off past `limit` bytes
/// (`limits.max_request_body`): the frame that crosses it is an error, which
/// makes the upstream client abort the request, and `exceeded` is set so
/// that the handler answers `413` rather than `502`.
pub struct Bounded {
    inner: Body,
    seen: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl Bounded {
    /// Wraps `inner`; `exceeded` becomes true if it goes past `limit`.
    pub fn new(inner: Body, limit: u64) -> (Bounded, Arc<AtomicBool>) {
        let exceeded = Arc::new(AtomicBool::new(false));
        let body = Bounded {
            inner,
            seen: 0,
            limit,
            exceeded: exceeded.clone(),
        };
        (body, exceeded)
    }
}

/// What a [`Bounded`] body fails with past its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

impl http_body::Body for Bounded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            this.seen = this.seen.saturating_add(data.len() as u64);
            if this.seen > this.limit {
                this.exceeded.store(true, Ordering::SeqCst);
                return Poll::Ready(Some(Err(Box::new(TooLarge(this.limit)))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps `held` (a rate-limit slot) until the body
/// ends or is dropped: a pass-through response holds its caller's slot
/// exactly as long as it streams.
pub struct Holding<T: Send + Sync + 'static> {
    inner: Body,
    held: Option<T>,
}

impl<T: Send + Sync + 'static> Holding<T> {
    pub fn new(inner: Body, held: T) -> Holding<T> {
        Holding {
            inner,
            held: Some(held),
        }
    }
}

impl<T: Send + Sync + Unpin + 'static> http_body::Body for Holding<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // Ended: let go now rather than when hyper drops the body.
            this.held = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A gap between two upstream chunks below which they count as one burst.
const BURST_GAP: Duration = Duration::from_millis(1);
/// Most bytes joined into one frame.
const MAX_JOINED: usize = 64 * 1024;
/// Most chunks joined into one frame.
const MAX_CHUNKS: u32 = 64;

/// Joins the data chunks an upstream body delivers in a burst into one
/// frame, so that a burst of events costs the next hop one wake-up and one
/// socket write instead of one per chunk.
///
/// hyper's HTTP/1 client hands its body over one chunk at a time: its
/// connection task decodes a chunk, waits for the reader to take it, then
/// decodes the next, even when the whole burst is already in its buffer.
/// During a burst (chunks less than [`BURST_GAP`] apart), this body yields
/// to that task after each chunk instead of returning it, and returns what
/// it gathered once the upstream has nothing more ready. An isolated chunk
/// (a chat token every few ms) is returned at once: no added latency.
///
/// A body that reads its connection itself when polled
/// ([`Coalesce::inline`], `upstream::direct`) needs no yielding: every
/// chunk already read is gathered in one poll, and the first poll that
/// finds nothing more returns what was gathered.
pub struct Coalesce<B: http_body::Body> {
    inner: B,
    /// The inner body drives its own connection: gather without yielding.
    inline: bool,
    /// Gathered during the current burst, not yet returned.
    buf: BytesMut,
    chunks: u32,
    /// What came after gathered data (the end, an error, trailers), returned next.
    held: Option<Option<Result<Frame<Bytes>, B::Error>>>,
    last_chunk: Option<Instant>,
}

impl<B: http_body::Body<Data = Bytes> + Unpin> Coalesce<B> {
    pub fn new(inner: B) -> Self {
        Coalesce {
            inner,
            inline: false,
            buf: BytesMut::new(),
            chunks: 0,
            held: None,
            last_chunk: None,
        }
    }

    /// For a body whose poll reads its connection (nothing to yield to).
    pub fn inline(inner: B) -> Self {
        Coalesce {
            inline: true,
            ..Coalesce::new(inner)
        }
    }

    fn take(&mut self) -> Frame<Bytes> {
        self.chunks = 0;
        Frame::data(self.buf.split().freeze())
    }
}

impl<B> http_body::Body for Coalesce<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(held) = this.held.take() {
            if this.buf.is_empty() {
                return Poll::Ready(held);
            }
            this.held = Some(held);
            return Poll::Ready(Some(Ok(this.take())));
        }
        if this.inline {
            return this.gather(cx);
        }
        let next = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending if this.buf.is_empty() => return Poll::Pending,
            // The burst is over (for now): send what it brought.
            Poll::Pending => return Poll::Ready(Some(Ok(this.take()))),
            Poll::Ready(next) => next,
        };
        let data = match next {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(this.hold(Some(Ok(frame)))),
            },
            other => return Poll::Ready(this.hold(other)),
        };
        let now = Instant::now();
        let burst = this
            .last_chunk
            .is_some_and(|t| now.saturating_duration_since(t) < BURST_GAP);
        this.last_chunk = Some(now);
        if !burst && this.buf.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        this.buf.extend_from_slice(&data);
        this.chunks += 1;
        if this.buf.len() >= MAX_JOINED || this.chunks >= MAX_CHUNKS {
            return Poll::Ready(Some(Ok(this.take())));
        }
        // Let the connection task hand over its next chunk, then look again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.buf.is_empty() && self.inner.is_end_stream()
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> Coalesce<B> {
    /// Inline: every chunk the inner body has ready now, as one frame (a
    /// lone chunk as it came, without a copy).
    fn gather(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut first: Option<Bytes> = None;
        loop {
            let next = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => {
                    return match first {
                        Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                        None if self.buf.is_empty() => Poll::Pending,
                        None => Poll::Ready(Some(Ok(self.take()))),
                    }
                }
                Poll::Ready(next) => next,
            };
            let data = match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => return Poll::Ready(self.hold_after(first, Some(Ok(frame)))),
                },
                other => return Poll::Ready(self.hold_after(first, other)),
            };
            if first.is_none() && self.buf.is_empty() {
                first = Some(data);
                continue;
            }
            if let Some(first) = first.take() {
                self.buf.extend_from_slice(&first);
                self.chunks += 1;
            }
            self.buf.extend_from_slice(&data);
            self.chunks += 1;
            if self.buf.len() >= MAX_JOINED || self.chunks >= MAX_CHUNKS {
                return Poll::Ready(Some(Ok(self.take())));
            }
        }
    }

    /// [`Coalesce::hold`], with a lone chunk not yet in the buffer.
    fn hold_after(
        &mut self,
        first: Option<Bytes>,
        next: Option<Result<Frame<Bytes>, B::Error>>,
    ) -> Option<Result<Frame<Bytes>, B::Error>> {
        match first {
            Some(data) => {
                self.held = Some(next);
                Some(Ok(Frame::data(data)))
            }
            None => self.hold(next),
        }
    }

    /// Returns `next` now if nothing is gathered, else the gathered data
    /// now and `next` after it.
    fn hold(
        &mut self,
        next: Option<Result<Frame<Bytes>, B::Error>>,
    ) -> Option<Result<Frame<Bytes>, B::Error>> {
        if self.buf.is_empty() {
            return next;
        }
        self.held = Some(next);
        Some(Ok(self.take()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_bodies_fail_past_the_limit_and_say_so() {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"12345"))),
            Ok(Frame::data(Bytes::from_static(b"67890"))),
        ];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(chunks)).boxed();
        let (body, exceeded) = Bounded::new(inner, 9);
        let err = body.collect().await.unwrap_err();
        assert!(err.is::<TooLarge>());
        assert!(exceeded.load(Ordering::SeqCst));

        let (body, exceeded) = Bounded::new(full("1234567890"), 10);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "1234567890");
        assert!(!exceeded.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn holding_bodies_let_go_at_the_end() {
        let held = Arc::new(());
        let body = Holding::new(full("abc"), held.clone());
        assert_eq!(Arc::strong_count(&held), 2);
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        assert_eq!(Arc::strong_count(&held), 1);
    }
    use http_body_util::{BodyExt, StreamBody};

    type Item = Result<Frame<Bytes>, std::io::Error>;

    /// Drains a body: the data in order, then what ended it.
    async fn drain(
        body: &mut Coalesce<StreamBody<futures::stream::Iter<std::vec::IntoIter<Item>>>>,
    ) -> (Vec<u8>, Option<String>) {
        let mut data = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => return (data, f.trailers_ref().map(|_| "trailers".into())),
                },
                Some(Err(e)) => return (data, Some(e.to_string())),
                None => return (data, None),
            }
        }
    }

    fn body(
        items: Vec<Item>,
    ) -> Coalesce<StreamBody<futures::stream::Iter<std::vec::IntoIter<Item>>>> {
        Coalesce::new(StreamBody::new(futures::stream::iter(items)))
    }

    fn chunks(n: usize) -> Vec<Item> {
        (0..n)
            .map(|i| Ok(Frame::data(Bytes::from(format!("chunk {i};")))))
            .collect()
    }

    fn expected(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("chunk {i};").into_bytes())
            .collect()
    }

    fn inline(
        items: Vec<Item>,
    ) -> Coalesce<StreamBody<futures::stream::Iter<std::vec::IntoIter<Item>>>> {
        Coalesce::inline(StreamBody::new(futures::stream::iter(items)))
    }

    #[tokio::test]
    async fn joined_chunks_keep_every_byte_in_order_then_the_end() {
        // More chunks than one frame may join, so that joining restarts.
        let n = 2 * MAX_CHUNKS as usize + 3;
        for make in [body, inline] {
            let mut b = make(chunks(n));
            assert_eq!(drain(&mut b).await, (expected(n), None));
            assert!(b.frame().await.is_none());
        }
    }

    #[tokio::test]
    async fn an_error_or_trailers_come_after_the_gathered_data() {
        for make in [body, inline] {
            for n in [1, 5] {
                let mut items = chunks(n);
                items.push(Err(std::io::Error::other("reset")));
                assert_eq!(
                    drain(&mut make(items)).await,
                    (expected(n), Some("reset".into()))
                );
                let mut items = chunks(n);
                items.push(Ok(Frame::trailers(http::HeaderMap::new())));
                assert_eq!(
                    drain(&mut make(items)).await,
                    (expected(n), Some("trailers".into()))
                );
            }
        }
    }

    #[tokio::test]
    async fn inline_joins_what_is_ready_in_frames_of_at_most_max_chunks() {
        let n = 2 * MAX_CHUNKS as usize + 3;
        let mut b = inline(chunks(n));
        let mut sizes = Vec::new();
        while let Some(frame) = b.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            sizes.push(data.len());
        }
        assert_eq!(sizes.len(), 3, "{sizes:?}");
        assert_eq!(sizes[0], expected(MAX_CHUNKS as usize).len());
        assert_eq!(sizes.iter().sum::<usize>(), expected(n).len());
    }
}
