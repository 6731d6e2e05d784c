// The Vercel AI SDK's own chat transport (`ai` v5, DefaultChatTransport)
// against Reprise, for tests/ai_sdk.rs.
//
// Usage:
//   node ai_sdk.mjs send API CHAT_ID ABORT_AFTER
//       transport.sendMessages(...) with one user message, as useChat's
//       sendMessage does; prints each UI message chunk, and after
//       ABORT_AFTER chunks aborts the request (a tab closing mid-answer).
//   node ai_sdk.mjs reconnect API CHAT_ID
//       transport.reconnectToStream({ chatId }), as useChat({ resume: true })
//       does on mount; prints each chunk as it arrives, then the assistant
//       message the SDK rebuilds from them (readUIMessageStream).
//
// Reports go to stdout, one JSON object per line, as they happen:
//   {"kind":"chunk","chunk":{...}}   a UI message chunk, as the SDK parsed it
//   {"kind":"null"}                  reconnectToStream returned null (a 204)
//   {"kind":"aborted"}               send: the request was aborted
//   {"kind":"ui-error","message":s}  readUIMessageStream's onError (an error chunk)
//   {"kind":"message","message":{}} the rebuilt assistant message
//   {"kind":"end"}                   the stream ended
// Any failure exits 1 with the reason on stderr.

import { DefaultChatTransport, readUIMessageStream } from 'ai';

const emit = (report) => process.stdout.write(`${JSON.stringify(report)}\n`);

async function send(api, chatId, abortAfter) {
  const transport = new DefaultChatTransport({ api });
  const abort = new AbortController();
  const stream = await transport.sendMessages({
    chatId,
    trigger: 'submit-message',
    messageId: undefined,
    messages: [{ id: 'user-1', role: 'user', parts: [{ type: 'text', text: 'Tell me about resumable streams.' }] }],
    abortSignal: abort.signal,
  });
  const reader = stream.getReader();
  for (let n = 0; n < abortAfter; n++) {
    const { done, value } = await reader.read();
    if (done) throw new Error(`the stream ended after ${n} chunks, before the abort`);
    emit({ kind: 'chunk', chunk: value });
  }
  abort.abort();
  await reader.cancel().catch(() => {});
  emit({ kind: 'aborted' });
}

async function reconnect(api, chatId) {
  const transport = new DefaultChatTransport({ api });
  const stream = await transport.reconnectToStream({ chatId });
  if (stream === null) {
    emit({ kind: 'null' });
    return;
  }
  const [forReport, forMessage] = stream.tee();
  const rebuilt = (async () => {
    let message;
    const snapshots = readUIMessageStream({
      stream: forMessage,
      onError: (err) => emit({ kind: 'ui-error', message: String(err?.message ?? err) }),
    });
    for await (const snapshot of snapshots) message = snapshot;
    return message;
  })();
  for await (const chunk of forReport) emit({ kind: 'chunk', chunk });
  emit({ kind: 'message', message: await rebuilt });
  emit({ kind: 'end' });
}

const [mode, api, chatId, abortAfter] = process.argv.slice(2);
try {
  if (mode === 'send' && api && chatId && Number(abortAfter) > 0) {
    await send(api, chatId, Number(abortAfter));
  } else if (mode === 'reconnect' && api && chatId) {
    await reconnect(api, chatId);
  } else {
    throw new Error('usage: node ai_sdk.mjs send API CHAT_ID ABORT_AFTER | reconnect API CHAT_ID');
  }
} catch (err) {
  console.error(`ai_sdk.mjs ${mode}: ${err?.stack ?? err}`);
  process.exitCode = 1;
}
