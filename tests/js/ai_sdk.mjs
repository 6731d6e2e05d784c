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
//   node ai_sdk.mjs stop API CHAT_ID AFTER
//       like send, then after AFTER chunks does what an app's stop() does in
//       a resumable chat (the AI SDK's docs): abort the request and
//       POST {api}/{chatId}/stop. Reports {"kind":"stopped",status,body}.
//   node ai_sdk.mjs workflow API CHAT_ID START_INDEX
//       @ai-sdk/workflow's WorkflowChatTransport({ api, initialStartIndex })
//       .reconnectToStream({ chatId }): GET {api}/{chatId}/stream?startIndex=N,
//       and again from where it got to until a `finish` chunk. Reports every
//       response ({"kind":"response",status,url,tail}) and chunk.
//   node ai_sdk.mjs workflow-send API CHAT_ID CUT_AFTER
//       WorkflowChatTransport.sendMessages, with the POST's connection
//       failing after CUT_AFTER events: the transport resumes by itself with
//       ?startIndex=<chunks it got>. Reports responses and chunks.
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
import { WorkflowChatTransport } from '@ai-sdk/workflow';

const emit = (report) => process.stdout.write(`${JSON.stringify(report)}\n`);

// sendMessages with one user message, as useChat's sendMessage does; reads
// and reports `n` chunks, then aborts the request (a tab closing, stop()).
async function sendThenAbort(api, chatId, text, n) {
  const transport = new DefaultChatTransport({ api });
  const abort = new AbortController();
  const stream = await transport.sendMessages({
    chatId,
    trigger: 'submit-message',
    messageId: undefined,
    messages: [{ id: 'user-1', role: 'user', parts: [{ type: 'text', text }] }],
    abortSignal: abort.signal,
  });
  const reader = stream.getReader();
  for (let i = 0; i < n; i++) {
    const { done, value } = await reader.read();
    if (done) throw new Error(`the stream ended after ${i} chunks, before the abort`);
    emit({ kind: 'chunk', chunk: value });
  }
  abort.abort();
  await reader.cancel().catch(() => {});
}

async function send(api, chatId, abortAfter) {
  await sendThenAbort(api, chatId, 'Tell me about resumable streams.', abortAfter);
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

async function stop(api, chatId, after) {
  // stop(): the SDK aborts its request; the app tells the server.
  await sendThenAbort(api, chatId, 'Write a long essay.', after);
  const res = await fetch(`${api}/${encodeURIComponent(chatId)}/stop`, { method: 'POST' });
  emit({ kind: 'stopped', status: res.status, body: await res.json() });
}

// A fetch that reports each response, and can make a POST's body fail
// after `cutAfter` SSE events (a connection lost mid-answer).
function reportingFetch(cutAfter) {
  return async (url, init) => {
    const res = await fetch(url, init);
    emit({
      kind: 'response',
      method: init?.method ?? 'GET',
      url: String(url),
      status: res.status,
      tail: res.headers.get('x-workflow-stream-tail-index'),
    });
    if (!(init?.method === 'POST' && cutAfter > 0 && res.body)) return res;
    const upstream = res.body.getReader();
    const decoder = new TextDecoder();
    let seen = 0;
    let text = '';
    const body = new ReadableStream({
      async pull(controller) {
        // Fail only once what came before the cut was read: an error drops
        // whatever is still queued.
        if (seen === cutAfter) {
          upstream.cancel().catch(() => {});
          return controller.error(new Error('connection lost (test)'));
        }
        const { done, value } = await upstream.read();
        if (done) return controller.close();
        text += decoder.decode(value, { stream: true });
        // Pass whole events only, up to the cut.
        let end;
        while (seen < cutAfter && (end = text.indexOf('\n\n')) >= 0) {
          controller.enqueue(new TextEncoder().encode(text.slice(0, end + 2)));
          text = text.slice(end + 2);
          seen++;
        }
      },
    });
    return new Response(body, { status: res.status, headers: res.headers });
  };
}

async function workflow(api, chatId, startIndex) {
  const transport = new WorkflowChatTransport({
    api,
    initialStartIndex: startIndex,
    fetch: reportingFetch(0),
  });
  const stream = await transport.reconnectToStream({ chatId });
  for await (const chunk of stream) emit({ kind: 'chunk', chunk });
  emit({ kind: 'end' });
}

async function workflowSend(api, chatId, cutAfter) {
  const transport = new WorkflowChatTransport({
    api,
    fetch: reportingFetch(cutAfter),
    // The chat id in the body, where Reprise's route takes its key (the
    // app answers with the same id as `x-workflow-run-id`).
    prepareSendMessagesRequest: ({ id, messages }) => ({ body: { id, messages } }),
  });
  const stream = await transport.sendMessages({
    chatId,
    trigger: 'submit-message',
    messageId: undefined,
    messages: [{ id: 'user-1', role: 'user', parts: [{ type: 'text', text: 'Tell me about resumable streams.' }] }],
  });
  for await (const chunk of stream) emit({ kind: 'chunk', chunk });
  emit({ kind: 'end' });
}

const [mode, api, chatId, abortAfter] = process.argv.slice(2);
try {
  if (mode === 'send' && api && chatId && Number(abortAfter) > 0) {
    await send(api, chatId, Number(abortAfter));
  } else if (mode === 'reconnect' && api && chatId) {
    await reconnect(api, chatId);
  } else if (mode === 'stop' && api && chatId && Number(abortAfter) > 0) {
    await stop(api, chatId, Number(abortAfter));
  } else if (mode === 'workflow' && api && chatId && Number.isInteger(Number(abortAfter))) {
    await workflow(api, chatId, Number(abortAfter));
  } else if (mode === 'workflow-send' && api && chatId && Number(abortAfter) > 0) {
    await workflowSend(api, chatId, Number(abortAfter));
  } else {
    throw new Error('usage: node ai_sdk.mjs send API CHAT_ID ABORT_AFTER | reconnect API CHAT_ID | stop API CHAT_ID AFTER | workflow API CHAT_ID START_INDEX | workflow-send API CHAT_ID CUT_AFTER');
  }
} catch (err) {
  console.error(`ai_sdk.mjs ${mode}: ${err?.stack ?? err}`);
  process.exitCode = 1;
}
