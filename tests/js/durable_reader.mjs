// The real Durable Streams client (@durable-streams/client) reading a JSON
// stream live over SSE: `node durable_reader.mjs <url> <offset> [token]`.
// Reports, one JSON object per line: {"kind":"item","item":…,"offset":…}
// for each message (offset: where a resume continues after its batch),
// then {"kind":"closed","offset":…} when the stream is closed.
import { stream } from "@durable-streams/client";

const emit = (report) => process.stdout.write(`${JSON.stringify(report)}\n`);
const [url, offset, token] = process.argv.slice(2);

const res = await stream({
  url,
  offset,
  live: "sse",
  json: true,
  headers: token ? { Authorization: `Bearer ${token}` } : {},
});
await new Promise((resolve, reject) => {
  res.subscribeJson((batch) => {
    for (const item of batch.items) emit({ kind: "item", item, offset: batch.offset });
    if (res.streamClosed) resolve();
  });
  res.closed?.then?.(resolve, reject);
});
emit({ kind: "closed", offset: res.offset });
process.exit(0);
