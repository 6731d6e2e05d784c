//! Response and request body types shared by the relay's handlers, and the
//! wrappers that bound a forwarded request body and hold a rate-limit slot
//! while a response streams.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
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
}
