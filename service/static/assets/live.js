// Live updates: the service's Server-Sent Events stream (/api/dashboard/stream), else
// polling. Each tells the page which jobs changed; after any (re)connection it says
// "everything" ("*"), so what was missed while disconnected is refetched. Not Supabase
// Realtime: this page signs in with an API key and shows every job, while Realtime checks
// row-level security for a Supabase role, and the public anon key sees no job at all
// (sql/supabase_security.sql): a subscription with it would receive nothing.

import { authHeaders } from "./api.js";

const POLL_MS = 10000;
const EVERYTHING = ["*"];

export function startLive(config, { changed, status }) {
  const feed = { stopped: false, stops: [] };
  const stop = () => {
    feed.stopped = true;
    for (const fn of feed.stops) fn();
  };
  stream(config, feed, changed, status).catch((error) => {
    if (feed.stopped) return;
    status(`Live updates unavailable (${error.message}); polling every ${POLL_MS / 1000} s`);
    poll(feed, changed);
  });
  return stop;
}

function poll(feed, changed) {
  const timer = setInterval(() => changed(EVERYTHING), POLL_MS);
  feed.stops.push(() => clearInterval(timer));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- Server-Sent Events over fetch (so the API key can go in a header) -----------------

async function stream(config, feed, changed, status) {
  let backoff = 1000;
  let abort = null;
  feed.stops.push(() => abort?.abort());
  while (!feed.stopped) {
    abort = new AbortController();
    let response;
    try {
      status("Connecting to the live stream…");
      response = await fetch(config.stream, {
        headers: { Accept: "text/event-stream", ...authHeaders() }, signal: abort.signal, cache: "no-store",
      });
    } catch (error) {
      if (feed.stopped) return;
      status(`Live stream unreachable; retrying in ${backoff / 1000} s`);
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 30000);
      continue;
    }
    if (response.status === 401 || response.status === 404) throw new Error(`HTTP ${response.status}`);
    if (!response.ok || !response.body) {
      // 503: the service has as many streams open as it allows; poll for a while, then try again
      status(`Live stream busy; polling every ${POLL_MS / 1000} s`);
      for (let i = 0; i < 6 && !feed.stopped; i++) {
        changed(EVERYTHING);
        await sleep(POLL_MS);
      }
      continue;
    }
    try {
      await readEvents(response.body, (name, data) => {
        if (name === "ready") {
          backoff = 1000;
          status(data.mode === "listen" ? "Live: server events" : "Live: server events (polled by the service)");
          changed(EVERYTHING);
        } else if (name === "jobs") {
          changed(data.ids);
        }
      });
    } catch (error) {
      if (feed.stopped) return;
    }
    if (!feed.stopped) status("Live stream ended; reconnecting…");
  }
}

async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
