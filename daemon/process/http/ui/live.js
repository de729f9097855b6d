// Server-Sent Events read with fetch, not EventSource: EventSource cannot send the
// Authorization header. A stream reconnects after a break, resuming from the last event id
// it saw (Last-Event-ID), so nothing is missed; it stops while the tab is hidden and resumes
// where it was when the tab is shown again. A reader too slow for its events is sent
// `resync` with the id to resume after, and the stream ends: reconnecting resumes there.

import { headers, tokenRefused } from "./api.js";

const RETRY_FIRST = 1000;
const RETRY_MOST = 15000;

export class LiveStream {
  /** Follow the SSE stream at `path`; `onEvent(name, data, id)` for each event. When the
   * server ends the stream, it is followed again only if `resumes()` says so (a finished
   * job's stream ends for good, until `start()` again). */
  constructor(path, onEvent, { onState = () => {}, resumes = () => true } = {}) {
    this.path = path;
    this.onEvent = onEvent;
    this.onState = onState;
    this.resumes = resumes;
    this.lastId = null;
    this.abort = null;
    this.closed = false;
  }

  start() {
    if (this.closed || this.abort) return;
    this.abort = new AbortController();
    this.run(this.abort.signal);
  }

  /** Stop reading until `start()` again (the tab was hidden). */
  stop() {
    this.abort?.abort();
    this.abort = null;
    this.onState("paused");
  }

  close() {
    this.closed = true;
    this.abort?.abort();
    this.abort = null;
  }

  async run(signal) {
    let wait = RETRY_FIRST;
    while (!signal.aborted) {
      try {
        const extra = { Accept: "text/event-stream" };
        if (this.lastId !== null) extra["Last-Event-ID"] = this.lastId;
        const response = await fetch(this.path, { headers: headers(extra), signal });
        if (response.status === 401) {
          // The token works no more: following again would only be refused again.
          this.close();
          tokenRefused();
          return;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        this.onState("live");
        wait = RETRY_FIRST;
        await this.read(response.body, signal);
        if (!signal.aborted && !this.resumes()) {
          this.abort = null;
          this.onState("ended");
          return;
        }
      } catch (error) {
        if (signal.aborted) return;
      }
      if (signal.aborted) return;
      this.onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, wait));
      wait = Math.min(wait * 2, RETRY_MOST);
    }
  }

  async read(body, signal) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    while (!signal.aborted) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        this.dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  }

  dispatch(block) {
    let name = "message";
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (id !== null) this.lastId = id;
    if (!data.length || name === "resync") return;
    let parsed;
    try {
      parsed = JSON.parse(data.join("\n"));
    } catch {
      return;
    }
    this.onEvent(name, parsed, id);
  }
}
