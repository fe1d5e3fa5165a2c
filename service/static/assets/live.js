// Live updates, best first: Supabase Realtime on the jobs table (when the service is
// configured with SUPABASE_URL and SUPABASE_ANON_KEY), else the service's Server-Sent
// Events stream (/api/dashboard/stream), else polling. Each tells the page which jobs
// changed; after any (re)connection it says "everything" ("*"), so what was missed while
// disconnected is refetched.

import { authHeaders } from "./api.js";

const POLL_MS = 10000;
const EVERYTHING = ["*"];

export function startLive(config, { changed, status }) {
  const feed = { stopped: false, stops: [] };
  const stop = () => {
    feed.stopped = true;
    for (const fn of feed.stops) fn();
  };
  const run = config.supabase ? realtime(config.supabase, feed, changed, status) : stream(config, feed, changed, status);
  run.catch((error) => {
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

// --- Supabase Realtime -------------------------------------------------------------------

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const existing = document.querySelector(`script[src="${src}"]`);
    if (existing && window.supabase) return resolve();
    const script = document.createElement("script");
    script.src = src;
    script.onload = () => resolve();
    script.onerror = () => reject(new Error("supabase-js is not installed on the service (npm ci)"));
    document.head.append(script);
  });
}

async function realtime(settings, feed, changed, status) {
  status("Connecting to Supabase Realtime…");
  await loadScript("assets/vendor/supabase.js");
  const client = window.supabase.createClient(settings.url, settings.anon_key, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
  });
  const channel = client.channel("dashboard-jobs")
    .on("postgres_changes", { event: "*", schema: "public", table: "jobs" }, (change) => {
      const id = (change.new && change.new.id) || (change.old && change.old.id);
      changed(id ? [id] : EVERYTHING);
    })
    .subscribe((state, error) => {
      if (state === "SUBSCRIBED") {
        status("Live: Supabase Realtime");
        changed(EVERYTHING);  // connected or reconnected: fetch what may have been missed
      } else if (state === "CHANNEL_ERROR" || state === "TIMED_OUT") {
        status(`Reconnecting to Supabase Realtime…${error ? ` (${error.message})` : ""}`);
      } else if (state === "CLOSED" && !feed.stopped) {
        status("Supabase Realtime closed; reconnecting…");
      }
    });
  feed.stops.push(() => {
    client.removeChannel(channel);
    client.realtime.disconnect();
  });
}

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
      changed(EVERYTHING);
      await sleep(6 * POLL_MS);
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
