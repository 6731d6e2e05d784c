//! The downstream end of the request's path (**client** → relay → upstream): real HTTP clients
//! for integration tests.
//!
//! Built on reqwest and the `eventsource-stream` crate, never on Reprise's own SSE parser: the
//! tests check the relay's output against a second, independent reading of the SSE spec.
//! Every wait is bounded (by [`TIMEOUT`] unless changed), so a test fails instead of hanging.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use eventsource_stream::{EventStream, EventStreamError, Eventsource};
use futures::stream::{BoxStream, Stream, StreamExt};
use http::{HeaderMap, StatusCode};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response};

use crate::{with_timeout_of, TIMEOUT};

/// A reqwest client set up for tests: no proxy from the environment, no request timeout
/// (waits are bounded by the helpers instead).
#[derive(Clone, Debug)]
pub struct SseClient {
    http: reqwest::Client,
}

impl Default for SseClient {
    fn default() -> Self {
        SseClient::new()
    }
}

impl SseClient {
    pub fn new() -> SseClient {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("SseClient: build reqwest client");
        SseClient { http }
    }

    /// The underlying reqwest client, for requests the helpers do not cover.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET url` with `accept: text/event-stream`. Add headers, then [`open_sse`] or
    /// [`RawResponse::open`].
    pub fn get(&self, url: &str) -> RequestBuilder {
        self.http.get(url).header(ACCEPT, "text/event-stream")
    }

    /// `POST url` with `accept: text/event-stream` and this body.
    pub fn post(&self, url: &str, body: impl Into<reqwest::Body>) -> RequestBuilder {
        self.http
            .post(url)
            .header(ACCEPT, "text/event-stream")
            .body(body)
    }

    /// `POST url` with a JSON body, `accept: text/event-stream`.
    pub fn post_json(&self, url: &str, body: &serde_json::Value) -> RequestBuilder {
        self.post(url, body.to_string())
            .header(CONTENT_TYPE, "application/json")
    }

    /// `GET url` as an SSE stream.
    pub async fn open_get(&self, url: &str) -> SseResponse {
        open_sse(self.get(url)).await
    }
}

/// Sends `request` and returns the response head with its body as an event stream, whatever
/// the status. Panics if the request fails or the head takes longer than [`TIMEOUT`].
pub async fn open_sse(request: RequestBuilder) -> SseResponse {
    SseResponse::from_response(send(request).await)
}

/// Sends `request`; panics (bounded) on a transport error.
pub async fn send(request: RequestBuilder) -> Response {
    match try_send(request).await {
        Ok(response) => response,
        Err(err) => panic!("client: request failed: {}", error_chain(&err)),
    }
}

/// Sends `request`, returning a transport error (e.g. connection refused) instead of
/// panicking. Still panics if nothing happens within [`TIMEOUT`].
pub async fn try_send(request: RequestBuilder) -> Result<Response, reqwest::Error> {
    with_timeout_of(TIMEOUT, "client: the response head", request.send()).await
}

/// One event as the independent parser dispatched it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id *as a browser sees it*: an event without an `id:` field carries the
    /// previous one (empty if none was ever set).
    pub id: String,
    /// The event type; `message` when the event had no `event:` field.
    pub event: String,
    /// The data lines joined with `\n`.
    pub data: String,
    pub retry: Option<Duration>,
}

impl SseEvent {
    /// The data parsed as JSON; panics with the data in the message if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|err| panic!("SSE data is not JSON ({err}): {:?}", self.data))
    }
}

impl From<eventsource_stream::Event> for SseEvent {
    fn from(event: eventsource_stream::Event) -> Self {
        SseEvent {
            id: event.id,
            event: event.event,
            data: event.data,
            retry: event.retry,
        }
    }
}

/// Why an event stream stopped without a clean end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// The connection failed mid-body (e.g. no terminating chunk): the truncation case.
    Transport(String),
    /// The body was not valid UTF-8.
    Utf8(String),
    /// The parser rejected the body.
    Parse(String),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Transport(err) => write!(f, "transport error: {err}"),
            BodyError::Utf8(err) => write!(f, "UTF-8 error: {err}"),
            BodyError::Parse(err) => write!(f, "parse error: {err}"),
        }
    }
}

impl std::error::Error for BodyError {}

impl From<EventStreamError<reqwest::Error>> for BodyError {
    fn from(err: EventStreamError<reqwest::Error>) -> Self {
        match err {
            EventStreamError::Transport(err) => BodyError::Transport(error_chain(&err)),
            EventStreamError::Utf8(err) => BodyError::Utf8(err.to_string()),
            EventStreamError::Parser(err) => BodyError::Parse(err.to_string()),
        }
    }
}

/// Everything a stream produced until it ended or failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub events: Vec<SseEvent>,
    /// `None` when the body ended cleanly.
    pub error: Option<BodyError>,
}

impl Collected {
    /// The `data` of every event, in order.
    pub fn data(&self) -> Vec<&str> {
        self.events
            .iter()
            .map(|event| event.data.as_str())
            .collect()
    }
}

type ByteStream = BoxStream<'static, Result<Bytes, reqwest::Error>>;

/// An open SSE response: its head, and its body as parsed events. Dropping it (or
/// [`SseResponse::disconnect`]) closes the connection mid-stream.
pub struct SseResponse {
    status: StatusCode,
    headers: HeaderMap,
    events: EventStream<ByteStream>,
    /// Bound on each wait for the body.
    timeout: Duration,
}

impl SseResponse {
    /// Wraps a response whose head has arrived.
    pub fn from_response(response: Response) -> SseResponse {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes: ByteStream = response.bytes_stream().boxed();
        SseResponse {
            status,
            headers,
            events: bytes.eventsource(),
            timeout: TIMEOUT,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The first value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The last event id seen so far (what a browser would resume from).
    pub fn last_event_id(&self) -> &str {
        self.events.last_event_id()
    }

    /// Changes the bound on each later wait (default [`TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The next event, `None` at a clean end of body, or why the body failed. Panics if
    /// nothing happens within the timeout.
    pub async fn next(&mut self) -> Option<Result<SseEvent, BodyError>> {
        let next = self.events.next();
        let next = with_timeout_of(self.timeout, "client: the next SSE event", next).await;
        next.map(|item| item.map(SseEvent::from).map_err(BodyError::from))
    }

    /// The next event; panics if the body ends, fails or stalls instead.
    pub async fn next_event(&mut self) -> SseEvent {
        match self.next().await {
            Some(Ok(event)) => event,
            Some(Err(err)) => panic!("client: expected an SSE event, body failed: {err}"),
            None => panic!("client: expected an SSE event, body ended"),
        }
    }

    /// The next `n` events (see [`SseResponse::next_event`]).
    pub async fn next_events(&mut self, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next_event().await);
        }
        events
    }

    /// Every remaining event until the body ends or fails.
    pub async fn collect_all(&mut self) -> Collected {
        let mut collected = Collected::default();
        while let Some(item) = self.next().await {
            match item {
                Ok(event) => collected.events.push(event),
                Err(err) => {
                    collected.error = Some(err);
                    break;
                }
            }
        }
        collected
    }

    /// Every remaining event until the server ends the body; panics if the body fails.
    pub async fn collect_until_end(&mut self) -> Vec<SseEvent> {
        let collected = self.collect_all().await;
        if let Some(err) = collected.error {
            panic!(
                "client: expected a clean end of body after {} event(s), body failed: {err}",
                collected.events.len()
            );
        }
        collected.events
    }

    /// Every remaining event until the body fails; panics if it ends cleanly instead.
    pub async fn collect_until_error(&mut self) -> (Vec<SseEvent>, BodyError) {
        let collected = self.collect_all().await;
        match collected.error {
            Some(err) => (collected.events, err),
            None => panic!(
                "client: expected the body to fail, it ended cleanly after {} event(s)",
                collected.events.len()
            ),
        }
    }

    /// Closes the connection mid-stream (same as dropping the response).
    pub fn disconnect(self) {
        drop(self);
    }

    /// The parsed events as a plain stream (unbounded waits: wrap in
    /// [`crate::with_timeout`]).
    pub fn into_stream(
        self,
    ) -> Pin<Box<dyn Stream<Item = Result<SseEvent, BodyError>> + Send + 'static>> {
        self.events
            .map(|item| item.map(SseEvent::from).map_err(BodyError::from))
            .boxed()
    }
}

impl fmt::Debug for SseResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("last_event_id", &self.last_event_id())
            .finish()
    }
}

/// A response read as raw bytes, for exact-wire assertions. Dropping it closes the connection.
pub struct RawResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: ByteStream,
    /// Received but not yet handed out.
    buffered: BytesMut,
    /// Bound on each wait for the body.
    timeout: Duration,
}

/// The rest of a raw body, up to its end or failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawBody {
    pub bytes: Bytes,
    /// `None` when the body ended cleanly.
    pub error: Option<String>,
}

impl RawBody {
    /// The bytes as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

impl RawResponse {
    /// Sends `request` and returns once the head arrived (bounded).
    pub async fn open(request: RequestBuilder) -> RawResponse {
        RawResponse::from_response(send(request).await)
    }

    pub fn from_response(response: Response) -> RawResponse {
        RawResponse {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes_stream().boxed(),
            buffered: BytesMut::new(),
            timeout: TIMEOUT,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The first value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Changes the bound on each later wait (default [`TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The body bytes up to and including the first `needle` not yet handed out; the rest
    /// stays buffered. Panics if the body ends, fails or stalls first.
    pub async fn read_until(&mut self, needle: &[u8]) -> Bytes {
        assert!(!needle.is_empty(), "read_until: empty needle");
        let mut searched = 0;
        loop {
            if let Some(at) = find(&self.buffered[searched..], needle) {
                return self
                    .buffered
                    .split_to(searched + at + needle.len())
                    .freeze();
            }
            // The needle may straddle what is buffered and what comes next.
            searched = self.buffered.len().saturating_sub(needle.len() - 1);
            match self.next_chunk().await {
                Some(Ok(chunk)) => self.buffered.extend_from_slice(&chunk),
                Some(Err(err)) => panic!(
                    "client: body failed before {:?} appeared: {err}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.buffered)
                ),
                None => panic!(
                    "client: body ended before {:?} appeared; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.buffered)
                ),
            }
        }
    }

    /// The rest of the body until the server ends it or it fails (bounded per chunk).
    pub async fn read_to_end(mut self) -> RawBody {
        let mut error = None;
        while let Some(chunk) = self.next_chunk().await {
            match chunk {
                Ok(chunk) => self.buffered.extend_from_slice(&chunk),
                Err(err) => {
                    error = Some(err);
                    break;
                }
            }
        }
        RawBody {
            bytes: self.buffered.freeze(),
            error,
        }
    }

    /// Closes the connection mid-body (same as dropping the response).
    pub fn disconnect(self) {
        drop(self);
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        let next = self.body.next();
        let next = with_timeout_of(self.timeout, "client: the next body chunk", next).await;
        next.map(|chunk| chunk.map_err(|err| error_chain(&err)))
    }
}

impl fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("buffered", &self.buffered.len())
            .finish()
    }
}

/// Sends `request` and reads the whole body raw: `(status, headers, body)`.
pub async fn read_raw(request: RequestBuilder) -> (StatusCode, HeaderMap, RawBody) {
    let response = RawResponse::open(request).await;
    let (status, headers) = (response.status, response.headers.clone());
    (status, headers, response.read_to_end().await)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// `err` and its sources, so a test sees "error decoding response body: … incomplete".
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        out.push_str(": ");
        out.push_str(&err.to_string());
        source = err.source();
    }
    out
}

/// Parses a whole SSE body with the independent parser (`eventsource-stream`): the events a
/// client dispatches.
pub async fn parse_sse(body: &[u8]) -> Vec<SseEvent> {
    let chunks = vec![Ok::<Bytes, std::convert::Infallible>(
        Bytes::copy_from_slice(body),
    )];
    let mut events = futures::stream::iter(chunks).eventsource();
    let mut parsed = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => parsed.push(SseEvent::from(event)),
            Err(err) => panic!("parse_sse: {err}"),
        }
    }
    parsed
}

/// The complete lines of an SSE body (CR, LF or CRLF terminated; a leading BOM skipped), as
/// the HTML standard splits them; a last line without terminator is not read.
fn sse_lines(body: &[u8]) -> Vec<&[u8]> {
    let mut rest = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut lines = Vec::new();
    while let Some(end) = rest.iter().position(|&b| b == b'\r' || b == b'\n') {
        lines.push(&rest[..end]);
        let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
        rest = &rest[end + if crlf { 2 } else { 1 }..];
    }
    lines
}

/// A line's field name and value (one leading space removed), `None` for a comment.
fn sse_field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    match line.iter().position(|&b| b == b':') {
        Some(0) => None,
        Some(colon) => {
            let value = &line[colon + 1..];
            Some((&line[..colon], value.strip_prefix(b" ").unwrap_or(value)))
        }
        None => Some((line, &[][..])),
    }
}

/// Every reconnection time a browser sets while reading `body`, in order, written here from
/// the HTML standard (not with Reprise's parser): each complete line whose field is `retry`
/// and whose value is ASCII digits sets it at once, whether or not its block is ever
/// dispatched.
pub fn reconnection_times(body: &[u8]) -> Vec<Duration> {
    sse_lines(body)
        .into_iter()
        .filter_map(sse_field)
        .filter(|(name, value)| {
            *name == b"retry" && !value.is_empty() && value.iter().all(u8::is_ascii_digit)
        })
        .filter_map(|(_, value)| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
        .map(Duration::from_millis)
        .collect()
}

/// The last event id a browser sends when it reconnects after reading `body`, by the HTML
/// standard: an `id` field (without NUL) sets the buffer, and every blank line makes it the
/// event source's last event id, even for a block with no data that dispatches no event
/// (`eventsource-stream` skips those).
pub fn browser_last_event_id(body: &[u8]) -> String {
    let (mut buffer, mut last) = (Vec::new(), Vec::new());
    for line in sse_lines(body) {
        if line.is_empty() {
            last.clone_from(&buffer);
            continue;
        }
        if let Some((b"id", value)) = sse_field(line) {
            if !value.contains(&0) {
                buffer = value.to_vec();
            }
        }
    }
    String::from_utf8_lossy(&last).into_owned()
}
