// The real Durable Streams client (@durable-streams/client) reading a JSON
// stream live over SSE: `node durable_reader.mjs <url> <offset> [token] [mode]`
// (mode `sse`, the default, or `catch-up`: read what is there and stop).
// Reports, one JSON object per line: {"kind":"item","item":…,"offset":…}
// for each message (offset: where a resume continues after its batch),
// then {"kind":"closed","offset":…,"streamClosed":…} when the stream is
// closed (or, in catch-up, when the read is up to date).
import { stream } from "@durable-streams/client";

const emit = (report) => process.stdout.write(`${JSON.stringify(report)}\n`);
const [url, offset, token, mode] = process.argv.slice(2);

const res = await stream({
  url,
  offset,
  live: mode === "catch-up" ? false : "sse",
  json: true,
  headers: token ? { Authorization: `Bearer ${token}` } : {},
});
if (mode === "catch-up") {
  for (const item of await res.json()) emit({ kind: "item", item, offset: res.offset });
} else await new Promise((resolve, reject) => {
  res.subscribeJson((batch) => {
    for (const item of batch.items) emit({ kind: "item", item, offset: batch.offset });
    if (res.streamClosed) resolve();
  });
  res.closed?.then?.(resolve, reject);
});
emit({ kind: "closed", offset: res.offset, streamClosed: res.streamClosed });
process.exit(0);
