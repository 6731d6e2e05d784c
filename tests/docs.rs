//! docs/integrations.md, run as written: every fenced code block is taken out
//! of the file and run against a real Reprise in front of mock upstreams that
//! speak the wire format the snippet expects (client program → [`Forwarder`]
//! → relay → [`Upstream`]).
//!
//! - `toml` blocks are loaded and validated with Reprise's own config loader,
//!   then used (upstream origin swapped for the mock's) as the config of the
//!   relay that the section's programs talk to.
//! - `python` blocks run with the virtualenv's interpreter (`tests/py`),
//!   `js` blocks with Node.js and the packages of `tests/js/docs`, `sh`
//!   blocks with bash. Each reads Reprise's address from `REPRISE_URL`, the
//!   doc's one convention.
//! - Blocks that cannot run on their own (a Next.js route, a React component,
//!   a page fragment) say so in their info string, ```` ```ts no-run="why" ````;
//!   there may be at most [`MAX_NO_RUN`] of them, each with its reason.
//! - The Durable Streams sections' programs run as the doc says to run them:
//!   the worker streams a mock OpenAI answer into a stream while the reader
//!   follows it live; the reader is stopped mid-answer and started again
//!   from the last offset it printed; the same reader follows a recorded
//!   answer and a proxied one, whose `curl` blocks run with the variables
//!   the earlier blocks set (as pasted into one shell). Reprise's secrets
//!   come from its environment ([`SECRETS`]), as the doc's configs say.
//!
//! The answers contain U+2028, U+2029 and U+0085 inside JSON strings (as the
//! APIs send them). Each resuming program has its connection to Reprise cut
//! mid-answer by the forwarder and must print the whole answer exactly once,
//! in order; with Reprise unreachable after the cut, it must give up after
//! exactly its `MAX_RECONNECTS` reconnections; and when the upstream fails
//! mid-answer, it must raise on Reprise's failure signal (whichever dialect
//! the route uses) rather than end quietly.

#[path = "py/python.rs"]
mod python;

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use reprise_relay::config::{Config, Overrides};
use reprise_tests::forwarder::Forwarder;
use reprise_tests::relay::{self, Backend, TestRelay};
use reprise_tests::{with_timeout_of, Reply, StreamControl, Upstream};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Bound on a program's run: starting Python or Node and importing an SDK,
/// plus up to `MAX_RECONNECTS` backoffs (about 6 s at most), on a shared
/// machine.
const PROGRAM_BOUND: Duration = Duration::from_secs(90);

/// At most this many blocks may be `no-run`.
const MAX_NO_RUN: usize = 5;

/// The answer every mock upstream streams, piece by piece: the line and
/// paragraph separators and NEL are valid unescaped in JSON strings, and a
/// client that splits lines at them (httpx's `iter_lines()`) breaks. Both
/// halves hold each of them, so both the first response and the resumed
/// one carry them.
const PIECES: &[&str] = &[
    "Hello",
    " wor\u{2028}ld,",
    " para\u{2029}graph",
    " and next\u{0085}line;",
    " é🎉 second\u{2028}half,",
    " more\u{2029}text",
    " and\u{0085}done",
    ".",
];

/// The connection is cut once the program printed this many pieces.
const CUT_AFTER: usize = 4;

/// Reprise's secrets, as its environment gives them to `reprise --config`
/// and the doc's programs read them (the same variables).
const SECRETS: &[(&str, &str)] = &[
    ("REPRISE_DURABLE_WRITE_TOKEN", "docs-write-token"),
    ("REPRISE_DURABLE_READ_TOKEN", "docs-read-token"),
    ("REPRISE_AUTH_SECRET", "docs-auth-secret"),
];

fn secret(name: &str) -> (&'static str, &'static str) {
    *SECRETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no test value for {name}"))
}

fn answer() -> String {
    PIECES.concat()
}

fn answer_before_cut() -> String {
    PIECES[..CUT_AFTER].concat()
}

// ---------------------------------------------------------------------------
// The doc's code blocks.

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/integrations.md")
}

/// One fenced code block of the doc.
#[derive(Clone, Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The `## ` heading it is under.
    section: String,
    /// The info string's first word.
    lang: String,
    /// `no-run="reason"`.
    no_run: Option<String>,
    code: String,
}

fn blocks() -> Vec<Block> {
    let text = std::fs::read_to_string(doc_path())
        .unwrap_or_else(|err| panic!("reading {}: {err}", doc_path().display()));
    let mut out = Vec::new();
    let mut section = String::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(mut block) = open.take() {
            if line.trim_end() == "```" {
                out.push(block);
            } else {
                block.code.push_str(line);
                block.code.push('\n');
                open = Some(block);
            }
            continue;
        }
        if let Some(title) = line.strip_prefix("## ") {
            title.clone_into(&mut section);
        } else if let Some(info) = line.strip_prefix("```") {
            let (lang, attrs) = info.split_once(' ').unwrap_or((info, ""));
            let attrs = attrs.trim();
            let no_run = if attrs.is_empty() {
                None
            } else {
                let reason = attrs
                    .strip_prefix("no-run=\"")
                    .and_then(|rest| rest.strip_suffix('"'))
                    .unwrap_or_else(|| {
                        panic!("line {}: unknown info string attribute {attrs:?}", i + 1)
                    });
                Some(reason.to_owned())
            };
            open = Some(Block {
                line: i + 1,
                section: section.clone(),
                lang: lang.to_owned(),
                no_run,
                code: String::new(),
            });
        }
    }
    assert!(open.is_none(), "an unclosed code fence in the doc");
    out
}

/// Which runner takes each block that runs: its section (heading prefix), its
/// language, and a text only that block of the section contains.
const RUNNERS: &[(&str, &str, &str)] = &[
    ("Next.js", "sh", "/api/chat/chat-1/stream\""),
    ("Next.js", "sh", "/api/chat/chat-1/stop"),
    ("Next.js", "sh", "/api/chat/chat-1/stream?startIndex"),
    ("OpenAI", "python", "import openai"),
    ("OpenAI", "js", "from 'openai'"),
    ("Anthropic", "python", "import anthropic"),
    ("Ollama", "sh", "curl"),
    ("Ollama", "python", "/api/chat\", json=request"),
    ("Ollama", "python", "import ollama"),
    (DURABLE_WORKER, "js", "DurableStream.create"),
    (DURABLE_WORKER, "js", "subscribeJson"),
    (DURABLE_RECORDED, "sh", "offset=-1"),
    (DURABLE_PROXY, "sh", "Upstream-URL"),
    (DURABLE_PROXY, "sh", "action=abort"),
];

/// The Durable Streams sections (heading prefixes).
const DURABLE_WORKER: &str = "Durable Streams: a worker";
const DURABLE_RECORDED: &str = "Recorded answers as Durable Streams";
const DURABLE_PROXY: &str = "Durable Streams proxy protocol";

fn matches(block: &Block, (section, lang, marker): (&str, &str, &str)) -> bool {
    block.section.starts_with(section) && block.lang == lang && block.code.contains(marker)
}

/// The one block a runner takes.
fn block(section: &str, lang: &str, marker: &str) -> Block {
    let found: Vec<Block> = blocks()
        .into_iter()
        .filter(|b| b.no_run.is_none() && matches(b, (section, lang, marker)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {lang} block containing {marker:?} under \"## {section}…\""
    );
    found.into_iter().next().expect("one block")
}

/// The section's `toml` block.
fn toml_block(section: &str) -> Block {
    let found: Vec<Block> = blocks()
        .into_iter()
        .filter(|b| b.lang == "toml" && b.section.starts_with(section))
        .collect();
    assert_eq!(found.len(), 1, "one toml block under \"## {section}…\"");
    found.into_iter().next().expect("one block")
}

/// `MAX_RECONNECTS = N` in a program.
fn max_reconnects(block: &Block) -> usize {
    let rest = block
        .code
        .split_once("MAX_RECONNECTS = ")
        .unwrap_or_else(|| panic!("line {}: no `MAX_RECONNECTS = N`", block.line))
        .1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|err| panic!("line {}: MAX_RECONNECTS: {err}", block.line))
}

/// Loads a `toml` block with Reprise's loader and validation, as
/// `reprise --config reprise.toml` does with [`SECRETS`] in its environment.
fn load(block: &Block) -> Config {
    let dir = tempfile::tempdir().expect("temporary directory for a toml block");
    let file = dir.path().join("reprise.toml");
    std::fs::write(&file, &block.code).expect("write the toml block");
    let over = Overrides {
        file: Some(file),
        ..Overrides::default()
    };
    let env = |name: &str| {
        SECRETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| (*v).to_owned())
    };
    let config = Config::load(&over, env)
        .unwrap_or_else(|err| panic!("line {}: the toml does not load: {err}", block.line));
    if let Err(err) = config.validate() {
        panic!("line {}: the toml does not validate: {err}", block.line);
    }
    config
}

/// `upstream` with its scheme and authority replaced by `mock`'s, path kept.
fn rebase(upstream: &str, mock: &str) -> String {
    let after_scheme = upstream
        .split_once("://")
        .map_or(upstream, |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    format!("{mock}{path}")
}

/// The relay config of a section: its `toml` block, with the mock as
/// upstream, the embedded store, and the suite's short timers.
fn relay_config(toml: &Block, mock: &str) -> Config {
    let mut config = load(toml);
    let base = relay::config(mock, &Backend::Memory);
    config.store = base.store;
    config.streams = base.streams;
    config.timeouts = base.timeouts;
    for route in &mut config.routes {
        route.upstream = rebase(&route.upstream, mock);
    }
    for allowed in &mut config.durable.proxy_allow {
        *allowed = rebase(allowed, mock);
    }
    config
}

// ---------------------------------------------------------------------------
// Running a block as a program.

/// A block running as a program, its stdout collected as it comes. Dropping
/// it kills the program.
struct Program {
    what: String,
    child: Child,
    /// Everything the program printed so far; the sender drops at EOF.
    out: watch::Receiver<Vec<u8>>,
    /// Holds the program's file (and its working directory) until it ends.
    _dir: tempfile::TempDir,
}

/// How to run a block of this language: interpreter, file name, and the
/// directory to put it in (for Node, under `tests/js/docs` so that its
/// imports resolve to that `node_modules`).
fn interpreter(lang: &str) -> (PathBuf, &'static str, Option<PathBuf>) {
    match lang {
        "python" => (python::python(), "snippet.py", None),
        "js" => {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js/docs");
            for package in ["openai", "@durable-streams/client"] {
                let installed = dir.join("node_modules").join(package).join("package.json");
                assert!(
                    installed.is_file(),
                    "{} is missing: run `npm ci --prefix tests/js/docs` (`bash tests/run.sh` does it)",
                    installed.display()
                );
            }
            (PathBuf::from("node"), "snippet.mjs", Some(dir))
        }
        "sh" => (PathBuf::from("bash"), "snippet.sh", None),
        other => panic!("no interpreter for {other} blocks"),
    }
}

impl Program {
    /// Starts `block` with `REPRISE_URL=reprise` (and test API keys, which the
    /// SDKs read from their usual variables). Its stderr goes to the test's
    /// output.
    fn spawn(block: &Block, reprise: &str) -> Program {
        Program::spawn_with(block, reprise, &[], &[])
    }

    /// [`Program::spawn`] with command-line `args` and more `env`; of
    /// [`SECRETS`], only those in `env` (not the test's own environment).
    fn spawn_with(block: &Block, reprise: &str, args: &[&str], env: &[(&str, &str)]) -> Program {
        let (program, file_name, parent) = interpreter(&block.lang);
        let dir = match &parent {
            Some(parent) => tempfile::Builder::new().prefix(".run-").tempdir_in(parent),
            None => tempfile::tempdir(),
        }
        .expect("temporary directory for a snippet");
        let file = dir.path().join(file_name);
        std::fs::write(&file, &block.code).expect("write the snippet");
        let what = format!(
            "the {} block at docs/integrations.md:{}",
            block.lang, block.line
        );
        let mut command = Command::new(&program);
        for (name, _) in SECRETS {
            command.env_remove(name);
        }
        let mut child = command
            .arg(&file)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .env("REPRISE_URL", reprise)
            .env("OPENAI_API_KEY", "sk-test")
            .env("ANTHROPIC_API_KEY", "sk-ant-test")
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONIOENCODING", "utf-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", program.display()));
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, out) = watch::channel(Vec::new());
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            // Ends at EOF or a read error; dropping `tx` tells the waiters.
            while let Ok(n @ 1..) = stdout.read(&mut buf).await {
                tx.send_modify(|out| out.extend_from_slice(&buf[..n]));
            }
        });
        Program {
            what,
            child,
            out,
            _dir: dir,
        }
    }

    fn printed(&self) -> String {
        String::from_utf8_lossy(&self.out.borrow()).into_owned()
    }

    /// Waits until the program printed exactly `expected` (so far).
    async fn wait_for_output(&mut self, expected: &str) {
        let what = format!("{} to print {expected:?}", self.what);
        let waited = with_timeout_of(
            PROGRAM_BOUND,
            &what,
            self.out.wait_for(|out| out.len() >= expected.len()),
        )
        .await
        .is_ok();
        let printed = self.printed();
        assert!(
            waited,
            "{} ended before printing {expected:?}; it printed {printed:?}",
            self.what
        );
        assert_eq!(printed, expected, "{} printed something else", self.what);
    }

    /// Waits until what the program printed contains `part`.
    async fn wait_for_part(&mut self, part: &str) {
        let what = format!("{} to print {part:?}", self.what);
        let seen = |out: &Vec<u8>| String::from_utf8_lossy(out).contains(part);
        let waited = with_timeout_of(PROGRAM_BOUND, &what, self.out.wait_for(seen))
            .await
            .is_ok();
        assert!(
            waited,
            "{} ended before printing {part:?}; it printed {:?}",
            self.what,
            self.printed()
        );
    }

    /// Waits until `done` holds for what the program printed so far.
    async fn wait_until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let waiting = format!("{} to print {what}", self.what);
        let seen = |out: &Vec<u8>| done(&String::from_utf8_lossy(out));
        let waited = with_timeout_of(PROGRAM_BOUND, &waiting, self.out.wait_for(seen))
            .await
            .is_ok();
        assert!(
            waited,
            "{} ended before printing {what}; it printed {:?}",
            self.what,
            self.printed()
        );
    }

    /// Waits for the program to exit; its status and everything it printed.
    async fn finish(mut self) -> (ExitStatus, String) {
        let what = format!("{} to exit", self.what);
        let status = with_timeout_of(PROGRAM_BOUND, &what, self.child.wait())
            .await
            .unwrap_or_else(|err| panic!("waiting for {}: {err}", self.what));
        // The reader drops its sender at EOF, which follows the exit.
        let eof = format!("{}'s stdout to close", self.what);
        let _ = with_timeout_of(PROGRAM_BOUND, eof, self.out.wait_for(|_| false)).await;
        let printed = self.printed();
        (status, printed)
    }
}

// ---------------------------------------------------------------------------
// Mock upstreams: the answer in each API's wire format.

#[derive(Clone, Copy, Debug)]
enum Wire {
    /// OpenAI chat completion chunks, then `data: [DONE]`.
    OpenAi,
    /// Anthropic Messages events, with `ping`s.
    Anthropic,
    /// Ollama `/api/chat` NDJSON. `go_escaped`: U+2028 and U+2029 escaped as
    /// Ollama's Go encoder writes them, and U+0085 too before the cut (see
    /// `ollama_client`).
    Ollama { go_escaped: bool },
    /// The AI SDK's UI message stream.
    AiSdk,
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    let head = event.map_or_else(String::new, |e| format!("event: {e}\n"));
    // serde_json writes U+2028, U+2029 and U+0085 unescaped, as the APIs do.
    Bytes::from(format!("{head}data: {data}\n\n"))
}

/// Which separators an NDJSON line carries escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    /// U+2028 and U+2029, as Go's encoder (Ollama's) writes them.
    Go,
    /// U+0085 too, which Go leaves raw.
    All,
}

fn ndjson(line: &Value, escape: Escape) -> Bytes {
    let mut text = line.to_string();
    if escape != Escape::None {
        text = text
            .replace('\u{2028}', "\\u2028")
            .replace('\u{2029}', "\\u2029");
    }
    if escape == Escape::All {
        text = text.replace('\u{0085}', "\\u0085");
    }
    text.push('\n');
    Bytes::from(text)
}

/// The upstream's body for [`PIECES`]: one group of frames per piece, the
/// first and last also carrying the stream's opening and closing frames.
fn frames(wire: Wire) -> Vec<Vec<Bytes>> {
    let last = PIECES.len() - 1;
    PIECES
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut group = Vec::new();
            match wire {
                Wire::OpenAi => {
                    let chunk = |delta: Value, finish: Value| {
                        json!({"id": "chatcmpl-docs", "object": "chat.completion.chunk", "created": 1,
                               "model": "gpt-4o",
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                    };
                    if i == 0 {
                        let opening = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
                        group.push(sse(None, &opening));
                    }
                    group.push(sse(None, &chunk(json!({"content": piece}), Value::Null)));
                    if i == last {
                        group.push(sse(None, &chunk(json!({}), json!("stop"))));
                        group.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    }
                }
                Wire::Anthropic => {
                    if i == 0 {
                        let start = json!({"type": "message_start", "message": {
                            "id": "msg_docs", "type": "message", "role": "assistant",
                            "model": "claude-sonnet-4-5", "content": [], "stop_reason": null,
                            "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 1}}});
                        group.push(sse(Some("message_start"), &start));
                        let block = json!({"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}});
                        group.push(sse(Some("content_block_start"), &block));
                    }
                    // Pings are events of the recording the SDK would not count.
                    if i % 2 == 0 {
                        group.push(sse(Some("ping"), &json!({"type": "ping"})));
                    }
                    let delta = json!({"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": piece}});
                    group.push(sse(Some("content_block_delta"), &delta));
                    if i == last {
                        let stop = json!({"type": "content_block_stop", "index": 0});
                        group.push(sse(Some("content_block_stop"), &stop));
                        let delta = json!({"type": "message_delta",
                            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                            "usage": {"output_tokens": PIECES.len()}});
                        group.push(sse(Some("message_delta"), &delta));
                        group.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
                    }
                }
                Wire::Ollama { go_escaped } => {
                    let line = |content: &str, done: bool| {
                        let mut line = json!({"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z",
                                              "message": {"role": "assistant", "content": content},
                                              "done": done});
                        if done {
                            line["done_reason"] = json!("stop");
                        }
                        line
                    };
                    // U+0085 stays raw after the cut, where the doc's `body_lines` reads it.
                    let escaping = match (go_escaped, i < CUT_AFTER) {
                        (false, _) => Escape::None,
                        (true, true) => Escape::All,
                        (true, false) => Escape::Go,
                    };
                    group.push(ndjson(&line(piece, false), escaping));
                    if i == last {
                        group.push(ndjson(&line("", true), escaping));
                    }
                }
                Wire::AiSdk => {
                    if i == 0 {
                        group.push(sse(None, &json!({"type": "start", "messageId": "msg-docs"})));
                        group.push(sse(None, &json!({"type": "text-start", "id": "t1"})));
                    }
                    let delta = json!({"type": "text-delta", "id": "t1", "delta": piece});
                    group.push(sse(None, &delta));
                    if i == last {
                        group.push(sse(None, &json!({"type": "text-end", "id": "t1"})));
                        group.push(sse(None, &json!({"type": "finish"})));
                        group.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    }
                }
            }
            group
        })
        .collect()
}

/// A one-shot controlled reply in `wire`'s content type.
fn controlled(upstream: &Upstream, wire: Wire) -> StreamControl {
    let (reply, control) = Reply::controlled();
    let reply = match wire {
        Wire::Ollama { .. } => reply.header("content-type", "application/x-ndjson"),
        Wire::AiSdk => reply.header("x-vercel-ai-ui-message-stream", "v1"),
        Wire::OpenAi | Wire::Anthropic => reply,
    };
    upstream.respond_once(reply);
    control
}

async fn push(control: &StreamControl, groups: &[Vec<Bytes>]) {
    for frame in groups.iter().flatten() {
        control.send(frame.clone()).await;
    }
}

// ---------------------------------------------------------------------------
// The runs.

/// Mock upstream, Reprise, and the forwarder the programs reach it through.
struct Setup {
    upstream: Upstream,
    relay: TestRelay,
    forwarder: Forwarder,
}

impl Setup {
    /// Reprise configured by the section's `toml` block, or (`None`) by
    /// `reprise --upstream URL` as the doc starts it.
    async fn start(toml: Option<&Block>) -> Setup {
        let upstream = Upstream::start().await;
        let config = match toml {
            Some(toml) => relay_config(toml, &upstream.url()),
            None => relay::config(&upstream.url(), &Backend::Memory),
        };
        let relay = TestRelay::start(config).await;
        let forwarder = Forwarder::start(relay.addr()).await;
        Setup {
            upstream,
            relay,
            forwarder,
        }
    }
}

/// What the test does once the program printed the first [`CUT_AFTER`] pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// Cuts the connection, then streams the rest: the program must resume
    /// and print the whole answer once.
    ThenResume,
    /// Cuts it and makes Reprise unreachable: the program must fail after
    /// exactly `MAX_RECONNECTS` reconnections.
    ThenUnreachable,
    /// No cut: the upstream connection breaks instead, and Reprise ends the
    /// stream with its failure signal: the program must raise, not end
    /// quietly with half an answer.
    UpstreamFails,
}

/// Runs a resuming program against `wire`, cutting its connection mid-answer.
async fn run_with_a_cut(block: Block, toml: Option<Block>, wire: Wire, path: &str, cut: Cut) {
    let setup = Setup::start(toml.as_ref()).await;
    let control = controlled(&setup.upstream, wire);
    let groups = frames(wire);
    let mut program = Program::spawn(&block, &setup.forwarder.url());
    push(&control, &groups[..CUT_AFTER]).await;
    program.wait_for_output(&answer_before_cut()).await;
    assert_eq!(control.request().await.path(), path, "the upstream request");

    let before = setup.forwarder.accepted();
    match cut {
        Cut::ThenResume => {
            setup.forwarder.cut();
            // The program's resume reaches Reprise; the rest arrives live.
            setup.forwarder.wait_for_accepted(before + 1).await;
            push(&control, &groups[CUT_AFTER..]).await;
            control.finish();
            let (status, printed) = program.finish().await;
            assert!(
                status.success(),
                "the program failed ({status}); stderr above"
            );
            assert_eq!(printed, answer(), "the whole answer, once, in order");
            assert_eq!(
                setup.upstream.request_count(),
                1,
                "the resume was served by Reprise, not the upstream"
            );
        }
        Cut::UpstreamFails => {
            control.abort().await;
            let (status, printed) = program.finish().await;
            assert!(
                !status.success(),
                "the program must raise on the failure signal"
            );
            assert_eq!(printed, answer_before_cut());
            assert_eq!(setup.forwarder.accepted(), before, "no reconnection");
        }
        Cut::ThenUnreachable => {
            setup.forwarder.drop_all();
            let (status, printed) = program.finish().await;
            assert!(
                !status.success(),
                "the program must fail once its reconnections are spent"
            );
            assert_eq!(printed, answer_before_cut());
            assert_eq!(
                setup.forwarder.accepted() - before,
                max_reconnects(&block),
                "reconnections after the cut: exactly MAX_RECONNECTS"
            );
        }
    }
}

fn openai_python() -> (Block, Option<Block>) {
    (
        block("OpenAI", "python", "import openai"),
        Some(toml_block("OpenAI")),
    )
}

fn openai_js() -> (Block, Option<Block>) {
    (
        block("OpenAI", "js", "from 'openai'"),
        Some(toml_block("OpenAI")),
    )
}

fn anthropic_python() -> (Block, Option<Block>) {
    (
        block("Anthropic", "python", "import anthropic"),
        Some(toml_block("Anthropic")),
    )
}

fn ollama_httpx() -> (Block, Option<Block>) {
    (block("Ollama", "python", "/api/chat\", json=request"), None)
}

/// The `ollama` package itself splits lines with httpx's `iter_lines()`, so
/// the part of the answer it reads (before the cut) carries the separators
/// escaped: U+2028 and U+2029 as Ollama's Go encoder writes them, and U+0085
/// too, which Go leaves raw (the package would break on it with or without
/// Reprise, as the doc says). After the cut, read by the doc's `body_lines`,
/// U+0085 is raw.
fn ollama_client() -> (Block, Option<Block>) {
    (block("Ollama", "python", "import ollama"), None)
}

const OPENAI_PATH: &str = "/v1/chat/completions";
const ANTHROPIC_PATH: &str = "/v1/messages";
const OLLAMA_PATH: &str = "/api/chat";

#[tokio::test]
async fn every_block_runs_or_says_why_not() {
    let blocks = blocks();
    assert!(blocks.len() >= 12, "the doc's blocks were not found");
    let mut no_run = 0;
    for block in &blocks {
        if let Some(reason) = &block.no_run {
            no_run += 1;
            assert!(
                reason.split_whitespace().count() >= 5,
                "line {}: a no-run block must say why it cannot run",
                block.line
            );
            continue;
        }
        if block.lang == "toml" {
            continue; // Loaded by `toml_blocks_load_with_reprises_config_loader`.
        }
        let runners = RUNNERS.iter().filter(|r| matches(block, **r)).count();
        assert_eq!(
            runners, 1,
            "line {}: the {} block under \"## {}\" must be taken by exactly one runner of \
             tests/docs.rs (or be marked no-run=\"why\")",
            block.line, block.lang, block.section
        );
    }
    assert!(
        no_run <= MAX_NO_RUN,
        "{no_run} no-run blocks; at most {MAX_NO_RUN}"
    );
    for runner in RUNNERS {
        let taken = blocks
            .iter()
            .filter(|b| b.no_run.is_none() && matches(b, *runner))
            .count();
        assert_eq!(taken, 1, "runner {runner:?} takes {taken} blocks");
    }
}

#[tokio::test]
async fn toml_blocks_load_with_reprises_config_loader() {
    let tomls: Vec<Block> = blocks().into_iter().filter(|b| b.lang == "toml").collect();
    assert_eq!(
        tomls.len(),
        5,
        "Next.js, OpenAI, Anthropic, Durable Streams and proxy configs"
    );
    for toml in &tomls {
        let config = load(toml);
        assert!(
            !config.routes.is_empty() || config.durable.enabled,
            "line {}: neither routes nor Durable Streams",
            toml.line
        );
    }
    // The loader is strict: a misspelt key fails, so a loaded block means something.
    let mut misspelt = tomls[0].clone();
    misspelt.code = misspelt.code.replace("upstream =", "upstrem =");
    assert!(Config::from_toml(&misspelt.code).is_err());
}

#[tokio::test]
async fn openai_python_resumes_through_a_cut() {
    let (block, toml) = openai_python();
    run_with_a_cut(block, toml, Wire::OpenAi, OPENAI_PATH, Cut::ThenResume).await;
}

#[tokio::test]
async fn openai_python_gives_up_when_reprise_is_unreachable() {
    let (block, toml) = openai_python();
    run_with_a_cut(block, toml, Wire::OpenAi, OPENAI_PATH, Cut::ThenUnreachable).await;
}

#[tokio::test]
async fn openai_js_resumes_through_a_cut() {
    let (block, toml) = openai_js();
    run_with_a_cut(block, toml, Wire::OpenAi, OPENAI_PATH, Cut::ThenResume).await;
}

#[tokio::test]
async fn openai_js_gives_up_when_reprise_is_unreachable() {
    let (block, toml) = openai_js();
    run_with_a_cut(block, toml, Wire::OpenAi, OPENAI_PATH, Cut::ThenUnreachable).await;
}

#[tokio::test]
async fn anthropic_python_resumes_through_a_cut() {
    let (block, toml) = anthropic_python();
    run_with_a_cut(
        block,
        toml,
        Wire::Anthropic,
        ANTHROPIC_PATH,
        Cut::ThenResume,
    )
    .await;
}

#[tokio::test]
async fn anthropic_python_gives_up_when_reprise_is_unreachable() {
    let (block, toml) = anthropic_python();
    let wire = Wire::Anthropic;
    run_with_a_cut(block, toml, wire, ANTHROPIC_PATH, Cut::ThenUnreachable).await;
}

#[tokio::test]
async fn ollama_httpx_resumes_through_a_cut() {
    let (block, toml) = ollama_httpx();
    let wire = Wire::Ollama { go_escaped: false };
    run_with_a_cut(block, toml, wire, OLLAMA_PATH, Cut::ThenResume).await;
}

#[tokio::test]
async fn ollama_httpx_gives_up_when_reprise_is_unreachable() {
    let (block, toml) = ollama_httpx();
    let wire = Wire::Ollama { go_escaped: false };
    run_with_a_cut(block, toml, wire, OLLAMA_PATH, Cut::ThenUnreachable).await;
}

#[tokio::test]
async fn ollama_client_resumes_through_a_cut() {
    let (block, toml) = ollama_client();
    let wire = Wire::Ollama { go_escaped: true };
    run_with_a_cut(block, toml, wire, OLLAMA_PATH, Cut::ThenResume).await;
}

#[tokio::test]
async fn ollama_client_gives_up_when_reprise_is_unreachable() {
    let (block, toml) = ollama_client();
    let wire = Wire::Ollama { go_escaped: true };
    run_with_a_cut(block, toml, wire, OLLAMA_PATH, Cut::ThenUnreachable).await;
}

#[tokio::test]
async fn openai_python_raises_when_the_upstream_fails() {
    let (block, toml) = openai_python();
    let wire = Wire::OpenAi;
    run_with_a_cut(block, toml, wire, OPENAI_PATH, Cut::UpstreamFails).await;
}

#[tokio::test]
async fn openai_js_raises_when_the_upstream_fails() {
    let (block, toml) = openai_js();
    let wire = Wire::OpenAi;
    run_with_a_cut(block, toml, wire, OPENAI_PATH, Cut::UpstreamFails).await;
}

#[tokio::test]
async fn anthropic_python_raises_when_the_upstream_fails() {
    let (block, toml) = anthropic_python();
    let wire = Wire::Anthropic;
    run_with_a_cut(block, toml, wire, ANTHROPIC_PATH, Cut::UpstreamFails).await;
}

#[tokio::test]
async fn ollama_httpx_raises_when_the_upstream_fails() {
    let (block, toml) = ollama_httpx();
    let wire = Wire::Ollama { go_escaped: false };
    run_with_a_cut(block, toml, wire, OLLAMA_PATH, Cut::UpstreamFails).await;
}

#[tokio::test]
async fn ollama_client_raises_when_the_upstream_fails() {
    let (block, toml) = ollama_client();
    let wire = Wire::Ollama { go_escaped: true };
    run_with_a_cut(block, toml, wire, OLLAMA_PATH, Cut::UpstreamFails).await;
}

/// The curl block: the whole answer, then the lines after the first two.
#[tokio::test]
async fn ollama_curl_block_reads_and_resumes() {
    let setup = Setup::start(None).await;
    let lines: Vec<Bytes> = frames(Wire::Ollama { go_escaped: false })
        .into_iter()
        .flatten()
        .collect();
    let body: Vec<u8> = lines.iter().flat_map(|l| l.to_vec()).collect();
    setup.upstream.respond_once(
        Reply::bytes(200, body.clone()).header("content-type", "application/x-ndjson"),
    );
    let program = Program::spawn(&block("Ollama", "sh", "curl"), &setup.relay.url());
    let (status, printed) = program.finish().await;
    assert!(status.success(), "the curl block failed ({status})");
    let rest: Vec<u8> = lines[2..].iter().flat_map(|l| l.to_vec()).collect();
    let expected = String::from_utf8([body, rest].concat()).expect("UTF-8");
    assert_eq!(
        printed, expected,
        "the answer, then its lines after the 2nd"
    );
    assert_eq!(setup.upstream.nth_request(1).await.path(), OLLAMA_PATH);
    assert_eq!(setup.upstream.request_count(), 1);
}

/// What follows `data: ` in each of the AI SDK frames of `groups`.
fn data_lines(groups: &[Vec<Bytes>]) -> Vec<String> {
    groups
        .iter()
        .flatten()
        .map(|frame| {
            let text = std::str::from_utf8(frame).expect("UTF-8");
            text.trim_end()
                .strip_prefix("data: ")
                .expect("a data line")
                .to_owned()
        })
        .collect()
}

/// The POST that starts chat `chat-1`'s answer, as the AI SDK sends it.
async fn start_chat_1(setup: &Setup) -> reqwest::Response {
    let response = reqwest::Client::new()
        .post(format!("{}/api/chat", setup.relay.url()))
        .header("content-type", "application/json")
        .body(json!({"id": "chat-1", "messages": [], "trigger": "submit-message"}).to_string())
        .send()
        .await
        .expect("the chat POST");
    assert_eq!(response.status(), 200);
    response
}

/// The Next.js section's stop block, run while the chat's answer streams:
/// the generation stops (the upstream sees its connection closed) and the
/// answer says so.
#[tokio::test]
async fn ai_sdk_stop_block_stops_the_generation() {
    let toml = toml_block("Next.js");
    let setup = Setup::start(Some(&toml)).await;
    let control = controlled(&setup.upstream, Wire::AiSdk);
    let groups = frames(Wire::AiSdk);
    let response = start_chat_1(&setup).await;
    push(&control, &groups[..CUT_AFTER]).await;
    drop(response);
    let program = Program::spawn(
        &block("Next.js", "sh", "/api/chat/chat-1/stop"),
        &setup.relay.url(),
    );
    let (status, printed) = program.finish().await;
    assert!(status.success(), "the stop block failed ({status})");
    let answer: Value = serde_json::from_str(printed.trim()).expect("a JSON answer");
    assert_eq!(answer["outcome"], "cancelled", "{printed}");
    control.closed().await;
}

/// The Next.js section's `startIndex` curl block, once the answer has
/// ended: the last 5 events, and the tail index among the headers.
#[tokio::test]
async fn ai_sdk_start_index_block_gets_the_tail() {
    let toml = toml_block("Next.js");
    let setup = Setup::start(Some(&toml)).await;
    let control = controlled(&setup.upstream, Wire::AiSdk);
    let groups = frames(Wire::AiSdk);
    let mut response = start_chat_1(&setup).await;
    push(&control, &groups).await;
    control.finish();
    while response.chunk().await.expect("the answer").is_some() {}
    let program = Program::spawn(
        &block("Next.js", "sh", "/api/chat/chat-1/stream?startIndex"),
        &setup.relay.url(),
    );
    let (status, printed) = program.finish().await;
    assert!(status.success(), "the startIndex block failed ({status})");
    let all = data_lines(&groups);
    let tail = format!("x-workflow-stream-tail-index: {}", all.len() - 1);
    assert!(
        printed.lines().any(|l| l.trim_end() == tail),
        "{tail:?} in {printed}"
    );
    let data: Vec<&str> = printed
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect();
    assert_eq!(data, all[all.len() - 5..], "the last 5 events");
}

/// The Next.js section's curl block, run while the chat's answer streams:
/// what a reconnecting `useChat` gets, the answer from its first part.
#[tokio::test]
async fn ai_sdk_curl_block_replays_the_chat_answer() {
    let toml = toml_block("Next.js");
    let setup = Setup::start(Some(&toml)).await;
    let control = controlled(&setup.upstream, Wire::AiSdk);
    let groups = frames(Wire::AiSdk);
    // The page's POST, as the AI SDK sends it (chat id `chat-1`).
    let response = start_chat_1(&setup).await;
    push(&control, &groups[..CUT_AFTER]).await;
    // The page goes away mid-answer; Reprise goes on recording.
    drop(response);
    let mut program = Program::spawn(
        &block("Next.js", "sh", "/api/chat/chat-1/stream\""),
        &setup.forwarder.url(),
    );
    // The replay reaches curl while the answer is live (a resume after the
    // end would get 204); then the rest follows.
    let last_before_cut = json!({"type": "text-delta", "id": "t1", "delta": PIECES[CUT_AFTER - 1]});
    program.wait_for_part(&last_before_cut.to_string()).await;
    push(&control, &groups[CUT_AFTER..]).await;
    control.finish();
    let (status, printed) = program.finish().await;
    assert!(status.success(), "the curl block failed ({status})");
    let data: Vec<&str> = printed
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect();
    let expected = data_lines(&groups);
    assert_eq!(data, expected, "every part from `start`, once, in order");
    assert_eq!(setup.upstream.nth_request(1).await.path(), "/api/chat");
    assert_eq!(setup.upstream.request_count(), 1);
}

// ---------------------------------------------------------------------------
// Durable Streams.

/// The doc's Durable Streams reader (`read.mjs`).
fn durable_reader() -> Block {
    block(DURABLE_WORKER, "js", "subscribeJson")
}

/// How many messages of what the reader printed belong to batches it
/// confirmed with an `offset` line (a read from that offset gets the rest).
fn confirmed(printed: &str) -> usize {
    let (mut saved, mut batch) = (0, 0);
    for line in printed.lines() {
        if line.starts_with("offset ") {
            saved += batch;
            batch = 0;
        } else {
            batch += 1;
        }
    }
    saved
}

/// The messages of the batches the reader confirmed, and the last offset
/// it printed.
fn reader_output(printed: &str) -> (Vec<Value>, Option<String>) {
    let (mut saved, mut batch, mut offset) = (Vec::new(), Vec::new(), None);
    for line in printed.lines() {
        if let Some(o) = line.strip_prefix("offset ") {
            saved.append(&mut batch);
            offset = Some(o.to_owned());
        } else {
            let message = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("the reader printed {line:?}: {err}"));
            batch.push(message);
        }
    }
    (saved, offset)
}

/// What a Durable Streams reader gets for SSE `groups`: one message per
/// event, its data as JSON when it is JSON, else as a string (`"[DONE]"`).
fn durable_messages(groups: &[Vec<Bytes>]) -> Vec<Value> {
    data_lines(groups)
        .into_iter()
        .map(|data| serde_json::from_str(&data).unwrap_or(Value::String(data)))
        .collect()
}

/// The doc's reader following `url` live while `control` streams `groups`:
/// each group is sent once the reader printed the messages before it
/// (`messages_after(k)`: how many the first `k` groups make); after
/// [`CUT_AFTER`] groups the reader is stopped, two more groups are written
/// while nobody reads, and the reader starts again from the last offset it
/// printed, reads those and the rest live, and must exit at the close.
/// Everything it printed across both runs.
async fn read_with_a_restart(
    reprise: &str,
    url: &str,
    env: &[(&str, &str)],
    control: StreamControl,
    groups: &[Vec<Bytes>],
    messages_after: impl Fn(usize) -> usize,
) -> Vec<Value> {
    let reader = durable_reader();
    let mut first = Program::spawn_with(&reader, reprise, &[url], env);
    for k in 1..=CUT_AFTER {
        push(&control, &groups[k - 1..k]).await;
        let n = messages_after(k);
        first
            .wait_until(&format!("{n} messages"), |out| confirmed(out) >= n)
            .await;
    }
    let (before, offset) = reader_output(&first.printed());
    assert_eq!(before.len(), messages_after(CUT_AFTER));
    drop(first); // Stopped mid-answer.
    let offset = offset.expect("the reader printed an offset");
    push(&control, &groups[CUT_AFTER..CUT_AFTER + 2]).await;
    let mut second = Program::spawn_with(&reader, reprise, &[url, &offset], env);
    let n = messages_after(CUT_AFTER + 2) - messages_after(CUT_AFTER);
    second
        .wait_until(&format!("{n} messages"), |out| confirmed(out) >= n)
        .await;
    push(&control, &groups[CUT_AFTER + 2..]).await;
    control.finish();
    let (status, printed) = second.finish().await;
    assert!(
        status.success(),
        "the restarted reader failed ({status}); stderr above"
    );
    let (after, _) = reader_output(&printed);
    [before, after].concat()
}

/// The worker block's environment: the write token, the mock as OpenAI.
fn worker_env(setup: &Setup) -> Vec<(&'static str, String)> {
    let (name, token) = secret("REPRISE_DURABLE_WRITE_TOKEN");
    vec![
        (name, token.to_owned()),
        ("OPENAI_BASE_URL", format!("{}/v1", setup.upstream.url())),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The Durable Streams section: the worker streams an answer into a stream
/// while the reader follows it live; the reader, stopped mid-answer and
/// started again from its last offset, prints every message once, in
/// order, and exits when the worker closes the stream.
#[tokio::test]
async fn durable_worker_and_reader_blocks_stream_live_and_resume_by_offset() {
    let setup = Setup::start(Some(&toml_block(DURABLE_WORKER))).await;
    let control = controlled(&setup.upstream, Wire::OpenAi);
    let groups = frames(Wire::OpenAi);
    let env = worker_env(&setup);
    let worker = Program::spawn_with(
        &block(DURABLE_WORKER, "js", "DurableStream.create"),
        &setup.relay.url(),
        &[],
        &borrowed(&env),
    );
    // The worker calls the model once it has created the stream.
    assert_eq!(control.request().await.path(), OPENAI_PATH);
    let url = format!("{}/v1/stream/answers/run-1", setup.relay.url());
    let read_token = [secret("REPRISE_DURABLE_READ_TOKEN")];
    let read = read_with_a_restart(
        &setup.relay.url(),
        &url,
        &read_token,
        control,
        &groups,
        |k| k,
    )
    .await;
    let expected: Vec<Value> = PIECES
        .iter()
        .map(|piece| json!({"type": "text-delta", "delta": piece}))
        .collect();
    assert_eq!(read, expected, "every message once, in order");
    let (status, printed) = worker.finish().await;
    assert!(
        status.success(),
        "the worker failed ({status}); stderr above"
    );
    assert_eq!(printed, format!("writing {url}\nclosed\n"));
}

/// The worker block when the model's answer breaks off: its readers get
/// the `error` message, then the close; the worker fails.
#[tokio::test]
async fn durable_worker_block_tells_readers_when_the_upstream_fails() {
    let setup = Setup::start(Some(&toml_block(DURABLE_WORKER))).await;
    let control = controlled(&setup.upstream, Wire::OpenAi);
    let groups = frames(Wire::OpenAi);
    let env = worker_env(&setup);
    let worker = Program::spawn_with(
        &block(DURABLE_WORKER, "js", "DurableStream.create"),
        &setup.relay.url(),
        &[],
        &borrowed(&env),
    );
    control.request().await;
    let url = format!("{}/v1/stream/answers/run-1", setup.relay.url());
    let read_token = [secret("REPRISE_DURABLE_READ_TOKEN")];
    let mut reader =
        Program::spawn_with(&durable_reader(), &setup.relay.url(), &[&url], &read_token);
    push(&control, &groups[..CUT_AFTER]).await;
    reader
        .wait_until("the first pieces", |out| confirmed(out) >= CUT_AFTER)
        .await;
    control.abort().await;
    let (status, printed) = worker.finish().await;
    assert!(!status.success(), "the worker must fail");
    assert_eq!(printed, format!("writing {url}\n"));
    let (status, printed) = reader.finish().await;
    assert!(
        status.success(),
        "the reader failed ({status}); stderr above"
    );
    let (read, _) = reader_output(&printed);
    let (last, first) = read.split_last().expect("messages");
    let expected: Vec<Value> = PIECES[..CUT_AFTER]
        .iter()
        .map(|piece| json!({"type": "text-delta", "delta": piece}))
        .collect();
    assert_eq!(first, expected, "the pieces before the failure");
    assert_eq!(last["type"], "error", "then the worker's error: {last}");
}

/// The recorded-answers block: a chat answer, then the recording read as a
/// Durable Stream from its start, one JSON message per event.
#[tokio::test]
async fn recorded_answer_block_reads_one_message_per_event() {
    let setup = Setup::start(Some(&toml_block("Next.js"))).await;
    let control = controlled(&setup.upstream, Wire::AiSdk);
    let groups = frames(Wire::AiSdk);
    let program = Program::spawn(
        &block(DURABLE_RECORDED, "sh", "offset=-1"),
        &setup.relay.url(),
    );
    assert_eq!(control.request().await.path(), "/api/chat");
    push(&control, &groups).await;
    control.finish();
    let (status, printed) = program.finish().await;
    assert!(status.success(), "the block failed ({status})");
    let read: Value = serde_json::from_str(printed.trim())
        .unwrap_or_else(|err| panic!("not a JSON array ({err}): {printed}"));
    assert_eq!(read, Value::Array(durable_messages(&groups)));
    assert_eq!(setup.upstream.request_count(), 1);
}

/// The reader block on a recorded chat answer (`/_reprise/streams/{id}`),
/// live, stopped, and restarted from its last offset.
#[tokio::test]
async fn reader_block_follows_a_recorded_answer_and_resumes_by_offset() {
    let setup = Setup::start(Some(&toml_block("Next.js"))).await;
    let control = controlled(&setup.upstream, Wire::AiSdk);
    let groups = frames(Wire::AiSdk);
    let response = start_chat_1(&setup).await;
    let id = response
        .headers()
        .get("reprise-stream-id")
        .and_then(|v| v.to_str().ok())
        .expect("Reprise-Stream-Id")
        .to_owned();
    drop(response); // The page went away; Reprise goes on recording.
    let url = format!("{}/_reprise/streams/{id}", setup.relay.url());
    let messages_after = |k: usize| groups[..k].iter().map(Vec::len).sum();
    let read = read_with_a_restart(
        &setup.relay.url(),
        &url,
        &[],
        control,
        &groups,
        messages_after,
    )
    .await;
    assert_eq!(
        read,
        durable_messages(&groups),
        "every event once, in order"
    );
}

/// The proxy section's blocks as pasted into one shell: the call starts
/// (the upstream gets the request), the reader follows the `Location`, the
/// abort closes the upstream connection and the reader sees the close
/// after what was recorded.
#[tokio::test]
async fn proxy_blocks_start_read_and_abort_an_upstream_call() {
    let setup = Setup::start(Some(&toml_block(DURABLE_PROXY))).await;
    let control = controlled(&setup.upstream, Wire::OpenAi);
    let groups = frames(Wire::OpenAi);
    let env = worker_env(&setup);
    let start = Program::spawn_with(
        &block(DURABLE_PROXY, "sh", "Upstream-URL"),
        &setup.relay.url(),
        &[],
        &borrowed(&env),
    );
    let (status, printed) = start.finish().await;
    assert!(status.success(), "the start block failed ({status})");
    let location = printed.trim().to_owned();
    assert!(
        location.starts_with(&format!("{}/v1/proxy/", setup.relay.url()))
            && location.contains("signature="),
        "a signed Location: {printed:?}"
    );
    let request = control.request().await;
    assert_eq!(request.path(), OPENAI_PATH);
    assert_eq!(request.header("authorization"), Some("Bearer sk-test"));

    let mut reader = Program::spawn_with(&durable_reader(), &setup.relay.url(), &[&location], &[]);
    push(&control, &groups[..CUT_AFTER]).await;
    let expected = durable_messages(&groups[..CUT_AFTER]);
    reader
        .wait_until("the first chunks", |out| confirmed(out) >= expected.len())
        .await;
    let abort = Program::spawn_with(
        &block(DURABLE_PROXY, "sh", "action=abort"),
        &setup.relay.url(),
        &[],
        &[("LOCATION", &location)],
    );
    let (status, printed) = abort.finish().await;
    assert!(status.success(), "the abort block failed ({status})");
    assert_eq!(printed, "204\n");
    control.closed().await;
    let (status, printed) = reader.finish().await;
    assert!(
        status.success(),
        "the reader failed ({status}); stderr above"
    );
    assert_eq!(reader_output(&printed).0, expected, "what was recorded");
    assert_eq!(setup.upstream.request_count(), 1);
}
