// A real browser EventSource in front of Reprise, for tests/browser.rs.
//
// Usage: node eventsource.mjs PAGE_URL
//
// Opens PAGE_URL in headless Chromium (Debian's /usr/bin/chromium, or
// $REPRISE_CHROMIUM; never a downloaded browser). The page (served by the
// test) opens an EventSource and calls window.report({...}) for each open,
// message, reprise-error and error. Every report is printed to stdout as one
// JSON line, as it happens, so the Rust test can act mid-stream.
//
// Once the EventSource is CLOSED (readyState 2: it gave up reconnecting, as
// after a 204), the script watches for QUIET_MS more, then prints
// {"kind":"final","readyState":N} and exits 0. Anything else exits 1 with the
// reason on stderr.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

// Long enough for several reconnection attempts at the page's `retry: 200`.
const QUIET_MS = 1000;
// The whole run; the Rust test bounds each step more tightly.
const DEADLINE_MS = 60_000;

const [pageUrl] = process.argv.slice(2);
if (!pageUrl) {
  console.error('usage: node eventsource.mjs PAGE_URL');
  process.exit(2);
}
const executablePath = process.env.REPRISE_CHROMIUM || '/usr/bin/chromium';
const emit = (report) => process.stdout.write(`${JSON.stringify(report)}\n`);

const profile = mkdtempSync(join(tmpdir(), 'reprise-chromium-'));
let context;
let deadline;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-proxy-server',
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (msg) => console.error(`page console: ${msg.text()}`));
  page.on('pageerror', (err) => console.error(`page error: ${err}`));

  let onClosed;
  const closed = new Promise((resolve) => {
    onClosed = resolve;
  });
  await page.exposeFunction('report', (report) => {
    emit(report);
    if (report.kind === 'error' && report.readyState === 2) onClosed();
  });
  const timedOut = new Promise((_, reject) => {
    deadline = setTimeout(
      () => reject(new Error(`the EventSource was not CLOSED within ${DEADLINE_MS} ms`)),
      DEADLINE_MS,
    );
  });

  await page.goto(pageUrl);
  await Promise.race([closed, timedOut]);
  // A CLOSED EventSource never reconnects; any report now would show it did.
  await page.waitForTimeout(QUIET_MS);
  emit({ kind: 'final', readyState: await page.evaluate(() => window.es.readyState) });
} catch (err) {
  console.error(`eventsource.mjs: ${err?.stack ?? err}`);
  process.exitCode = 1;
} finally {
  clearTimeout(deadline);
  await context?.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
