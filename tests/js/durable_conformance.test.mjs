// The Durable Streams conformance suite (@durable-streams/server-conformance-tests)
// against the server at $DS_BASE_URL, with the server's long-poll timeout in
// $DS_LONG_POLL_MS. Run by tests/durable.rs through vitest (the package's own
// CLI finds no tests when it is installed under node_modules).
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

const baseUrl = process.env.DS_BASE_URL;
if (!baseUrl) throw new Error("DS_BASE_URL is not set");

runConformanceTests({
  baseUrl,
  longPollTimeoutMs: Number(process.env.DS_LONG_POLL_MS ?? "3000"),
});
