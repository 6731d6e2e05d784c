// The official `openai` npm client reading a streamed chat completion
// through Reprise, for tests/clients.rs.
//
// Usage:
//   node openai.mjs BASE_URL
//       client.chat.completions.create({ stream: true }), iterated with
//       `for await`.
//
// Reports go to stdout, one JSON object per line, as they happen:
//   {"kind":"start","stream_id":s|null}   the response headers arrived
//   {"kind":"text","text":s}              one piece of answer text
//   {"kind":"done","text":s,"finish":s}   the stream ended normally
//   {"kind":"raised","type":s,"message":s,"code":s|null,"text":s}
//                                         the client threw while iterating
// A script bug exits 1 with the reason on stderr.

import OpenAI from 'openai';

const emit = (report) => process.stdout.write(`${JSON.stringify(report)}\n`);

const [baseURL] = process.argv.slice(2);
if (!baseURL) {
  console.error('usage: node openai.mjs BASE_URL');
  process.exit(1);
}
const client = new OpenAI({ baseURL, apiKey: 'sk-test', maxRetries: 0 });
const { data: stream, response } = await client.chat.completions
  .create({
    model: 'gpt-test',
    messages: [{ role: 'user', content: 'Tell me about resumable streams.' }],
    stream: true,
  })
  .withResponse();
emit({ kind: 'start', stream_id: response.headers.get('reprise-stream-id') });
let text = '';
let finish = null;
try {
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      const piece = choice.delta?.content;
      if (piece) {
        text += piece;
        emit({ kind: 'text', text: piece });
      }
      finish = choice.finish_reason ?? finish;
    }
  }
  emit({ kind: 'done', text, finish });
} catch (err) {
  emit({ kind: 'raised', type: err?.constructor?.name ?? typeof err, message: String(err?.message ?? err), code: err?.code ?? null, text });
}
