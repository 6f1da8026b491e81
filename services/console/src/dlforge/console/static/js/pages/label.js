// The labeling page, #/label/<dataset_id>: the items of the batch waiting for people, one large at a
// time (or a grid of the model's guesses to confirm at once), labeled with the keyboard.
//
// Keys: 1-9 pick a class, Enter accepts the model's guess, ← → move between items, Backspace or
// Ctrl+Z undo the last label, g toggles the grid.
//
// The next item appears without waiting for the server: the next images are fetched and decoded
// ahead (prefetch), and labels go to an outbox that is sent in the background, in order, a few at a
// time (every FLUSH_EVERY labels, after FLUSH_IDLE_MS without one, when the batch is done and when the
// page is left). The outbox is kept in sessionStorage until the server accepted it, so a failed or
// interrupted submission is shown and sent again, never dropped. The server's rule for an item
// labeled twice is "the submission accepted last wins" (with the history kept): an undo of a label
// already sent sends the label before it again, or, for an item that had none, asks for a new one.
//
// Each time a key press moves on to another item, the time from the key event to the frame after the
// new image is on screen is recorded as a performance measure named MEASURE (performance.getEntriesByName).
import { api, blobUrl, currentUser } from "../api.js";
import { clear, fmtPct, h } from "../dom.js";

export const MEASURE = "dlforge.label.next";
const FLUSH_EVERY = 5;
const FLUSH_IDLE_MS = 600;
const PREFETCH_AHEAD = 6;
const CACHE_LIMIT = 160;
const SIMILAR_K = 8;
const SIMILAR_DELAY_MS = 150;
const POLL_MS = [250, 500, 1000, 2000];
const REFRESH_MS = 15000; // while labeling: what others labeled meanwhile, a batch they finished
const GRID_PAGE = 48;
const IMAGE_TRIES = 4;
const RETRY_MS = [1000, 2000, 4000, 8000, 15000];
// a name people give (a class, the annotator): the labeler's rule (dlforge.common.classnames)
const ANNOTATOR = /^[^\x00-\x1f\x7f-\x9f/\\]{1,100}$/;

function ensureStyles() {
  if (document.getElementById("label-css")) return;
  document.head.append(h("link", { id: "label-css", rel: "stylesheet", href: "/console/label.css" }));
}

function pct(x) {
  return x === null || x === undefined ? "" : fmtPct(x, 0);
}

/** Images fetched with the token as blob URLs, decoded ahead; the least recently used are released. */
class ImageCache {
  constructor(datasetId) {
    this.datasetId = datasetId;
    this.entries = new Map(); // item_id -> {promise: Promise<{url, img}>, url}
  }

  path(itemId) {
    return `/labeler/datasets/${encodeURIComponent(this.datasetId)}/items/${encodeURIComponent(itemId)}/image`;
  }

  /** Promise of {url, img}: the blob URL and an <img> already decoded. */
  get(itemId, name) {
    let entry = this.entries.get(itemId);
    if (entry) {
      this.entries.delete(itemId);
      this.entries.set(itemId, entry);
      return entry.promise;
    }
    entry = { url: null, img: null };
    entry.promise = this.fetch(itemId).then(async (url) => {
      entry.url = url;
      const img = new Image();
      img.alt = name || itemId;
      img.src = url;
      try { await img.decode(); } catch { /* shown as the browser can */ }
      entry.img = img;
      return entry;
    });
    entry.promise.catch(() => this.entries.delete(itemId));
    this.entries.set(itemId, entry);
    this.trim();
    return entry.promise;
  }

  /** The image's blob URL; over the token's rate limit (429) or on a passing error, tried again a few times. */
  async fetch(itemId) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await blobUrl(this.path(itemId));
      } catch (err) {
        const passing = err.status === 429 || err.status === 503 || !err.status;
        if (!passing || attempt >= IMAGE_TRIES - 1) throw err;
        await new Promise((resolve) => setTimeout(resolve, 500 * 2 ** attempt));
      }
    }
  }

  ready(itemId) {
    const entry = this.entries.get(itemId);
    return entry && entry.img ? entry : null;
  }

  trim(keep = new Set()) {
    for (const [key, entry] of this.entries) {
      if (this.entries.size <= CACHE_LIMIT) break;
      if (keep.has(key) || !entry.url) continue;
      URL.revokeObjectURL(entry.url);
      this.entries.delete(key);
    }
  }

  release() {
    for (const entry of this.entries.values()) if (entry.url) URL.revokeObjectURL(entry.url);
    this.entries.clear();
  }
}

/**
 * Labels waiting to be sent, in the order they were given, kept in sessionStorage until accepted.
 * One submission at a time; a submission takes the waiting labels of one batch from the front, each
 * item once (a second label of an item goes in the next submission, so the server sees both in order).
 */
class Outbox {
  constructor(datasetId, onChange) {
    this.key = `dlforge.label.outbox.${datasetId}`;
    this.onChange = onChange;
    this.entries = this.load(); // {batch_id, item_id, label}
    this.inflight = null; // the entries being sent
    this.error = null; // {message, retryAt, permanent}
    this.refused = []; // entries the server refused for good, with the reason
    this.timer = null;
    this.tries = 0;
    this.stopped = false;
  }

  load() {
    try {
      const raw = JSON.parse(sessionStorage.getItem(this.key) || "[]");
      return Array.isArray(raw) ? raw.filter((e) => e && e.batch_id && e.item_id && e.label) : [];
    } catch { return []; }
  }

  save() {
    if (!this.unsent && this.error && !this.error.permanent) { // nothing left that failed
      this.error = null;
      this.tries = 0;
      clearTimeout(this.timer);
    }
    const all = [...(this.inflight || []), ...this.entries];
    if (all.length) sessionStorage.setItem(this.key, JSON.stringify(all));
    else sessionStorage.removeItem(this.key);
    this.onChange();
  }

  get unsent() {
    return this.entries.length + (this.inflight ? this.inflight.length : 0);
  }

  push(entry) {
    this.entries.push(entry);
    this.save();
  }

  /** Take back the label given as change ``key`` if it still waits (not sent); false if it left already. */
  takeBack(key) {
    for (let i = this.entries.length - 1; i >= 0; i--) {
      if (this.entries[i].key === key) {
        this.entries.splice(i, 1);
        this.save();
        return true;
      }
    }
    return false;
  }

  waiting(itemId) {
    return this.entries.some((e) => e.item_id === itemId) || (this.inflight || []).some((e) => e.item_id === itemId);
  }

  nextChunk() {
    const chunk = [];
    const seen = new Set();
    for (const e of this.entries) {
      if (chunk.length && (e.batch_id !== chunk[0].batch_id || seen.has(e.item_id))) break;
      chunk.push(e);
      seen.add(e.item_id);
    }
    return chunk;
  }

  body(chunk) {
    const labels = {};
    for (const e of chunk) labels[e.item_id] = e.label;
    const body = { dataset_id: chunk[0].dataset_id, batch_id: chunk[0].batch_id, labels };
    const name = currentUser()?.name;
    if (typeof name === "string" && ANNOTATOR.test(name.trim()) && name.trim().toLowerCase() !== "simulated") {
      body.annotator = name.trim();
    }
    return body;
  }

  /** Send what waits, one submission after the other; resolves once the outbox is empty or failing. */
  async flush() {
    if (this.inflight || this.stopped) return this.pending;
    clearTimeout(this.timer);
    this.timer = null;
    this.pending = (async () => {
      while (this.entries.length && !this.stopped) {
        const chunk = this.nextChunk();
        this.inflight = chunk;
        this.entries = this.entries.slice(chunk.length);
        this.onChange();
        try {
          await api("/labeler/labels", { method: "POST", json: this.body(chunk) });
          this.inflight = null;
          this.error = null;
          this.tries = 0;
          this.save();
        } catch (err) {
          this.inflight = null;
          if (this.permanent(err)) {
            this.refused.push(...chunk.map((e) => ({ ...e, reason: err.message })));
            this.error = { message: err.message, permanent: true, count: chunk.length };
            this.save();
            this.onRefused?.(chunk);
            continue;
          }
          this.entries = [...chunk, ...this.entries];
          const wait = RETRY_MS[Math.min(this.tries, RETRY_MS.length - 1)];
          this.tries += 1;
          this.error = { message: err.message, retryAt: Date.now() + wait, permanent: false, count: this.unsent };
          this.save();
          this.timer = setTimeout(() => this.flush(), wait);
          return;
        }
      }
    })();
    return this.pending;
  }

  /** A refusal that sending again cannot change (unknown item or batch, a bad label, final labels). */
  permanent(err) {
    const status = err.status || 0;
    if (status === 404 || status === 422) return true;
    if (status === 409) return !/being finalised/.test(err.message);
    return false;
  }

  /** Later, unless more labels come: after FLUSH_IDLE_MS, or at once with FLUSH_EVERY waiting. */
  schedule() {
    if (this.entries.length >= FLUSH_EVERY) { this.flush(); return; }
    if (this.error && !this.error.permanent) return; // the retry timer sends it
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.flush(), FLUSH_IDLE_MS);
  }

  /**
   * The page is hidden or left (``stop``: for good): send what waits with keepalive, which outlives
   * the page; it stays stored until the server accepted it, and is sent again when the page opens.
   */
  leave({ stop }) {
    if (stop) {
      this.stopped = true;
      clearTimeout(this.timer);
    }
    const chunk = this.nextChunk();
    if (chunk.length) {
      api("/labeler/labels", { method: "POST", json: this.body(chunk), keepalive: true }).then(() => {
        const left = this.load().filter((e) => !chunk.some((c) => c.item_id === e.item_id && c.label === e.label
          && c.batch_id === e.batch_id));
        if (left.length) sessionStorage.setItem(this.key, JSON.stringify(left)); else sessionStorage.removeItem(this.key);
      }).catch(() => { /* kept in sessionStorage: sent when the page opens again */ });
    }
  }
}

export async function render(root, params) {
  ensureStyles();
  const datasetId = params.datasetId;
  const images = new ImageCache(datasetId);
  const st = {
    queue: null, // the last queue read: {state, batch_id, round, classes, budget, items, run_id}
    items: [],
    index: 0,
    given: new Map(), // item_id -> the label given on this page (this batch)
    relabel: new Map(), // item_id -> the label sent, undone: the item waits for a new one
    elsewhere: new Set(), // items of the batch someone else labeled since the queue was read
    history: [], // undo stack: [{changes: [{key, item_id, before, label, batch_id}]}] (before: what it held)
    grid: false,
    selected: new Set(),
    extraClasses: [],
    waiting: false,
    showToken: 0,
    similar: new Map(), // item_id -> Promise of neighbours
    leaving: false,
  };
  const timers = new Set();
  let changeCount = Date.now(); // keys of the labels given here (an undo takes back its own, if not sent)
  const later = (fn, ms) => { const t = setTimeout(() => { timers.delete(t); fn(); }, ms); timers.add(t); return t; };

  const title = h("h1", {}, "Labeling");
  const progressBar = h("div", { class: "label-bar" }, h("span"));
  const progressText = h("span", { id: "label-progress" });
  const roundText = h("span", { id: "label-round", class: "muted" });
  const sendStatus = h("div", { id: "label-send", role: "status" });
  const notice = h("div", { id: "label-notice", role: "alert" });
  const body = h("div", { id: "label-body" });
  root.append(
    h("div", { class: "label-head" }, title,
      h("div", { class: "label-progress" }, progressBar, progressText, roundText),
      sendStatus),
    notice, body,
    h("p", { class: "muted label-keys" }, h("kbd", {}, "1"), "–", h("kbd", {}, "9"), " class · ",
      h("kbd", {}, "Enter"), " accept the guess · ", h("kbd", {}, "←"), " ", h("kbd", {}, "→"), " move · ",
      h("kbd", {}, "Backspace"), " / ", h("kbd", {}, "Ctrl+Z"), " undo · ", h("kbd", {}, "g"), " grid"));

  const outbox = new Outbox(datasetId, () => renderSendStatus());
  outbox.onRefused = (entries) => {
    // refused for good: the items of the batch shown wait for a label again
    for (const e of entries) {
      if (st.queue && e.batch_id === st.queue.batch_id && st.given.get(e.item_id) === e.label) st.given.delete(e.item_id);
    }
    if (st.waiting && st.items.some(isOpen)) { st.waiting = false; show(nextOpen(-1)); } else renderProgress();
  };

  // ---------------------------------------------------------------- what the page shows

  function classes() {
    const base = st.queue ? st.queue.classes : [];
    return [...base, ...st.extraClasses.filter((c) => !base.includes(c))];
  }

  function labeledCount() {
    if (!st.queue) return 0;
    // the queue lists items without a label when it was read: each given here since counts once more
    return st.queue.budget.labeled + st.items.filter((i) => !isOpen(i)).length;
  }

  function renderProgress() {
    if (!st.queue) return;
    const { total } = st.queue.budget;
    const done = labeledCount();
    progressBar.firstChild.style.width = `${total ? Math.min(100, (100 * done) / total) : 0}%`;
    progressText.textContent = `${done} of ${total} labeled (budget)`;
    progressText.dataset.labeled = String(done);
    progressText.dataset.total = String(total);
    const left = st.items.filter(isOpen).length;
    roundText.textContent = st.queue.round ? `round ${st.queue.round} · ${left} of ${st.items.length} left in this batch` : "";
  }

  function renderSendStatus() {
    clear(sendStatus);
    sendStatus.dataset.unsent = String(outbox.unsent);
    sendStatus.className = "";
    if (outbox.error && !outbox.error.permanent) {
      sendStatus.className = "error";
      const seconds = Math.max(0, Math.round((outbox.error.retryAt - Date.now()) / 1000));
      sendStatus.append(`${outbox.unsent} label(s) not sent: ${outbox.error.message}. Sending again in ${seconds} s `,
        h("button", { type: "button", class: "secondary", id: "label-retry", onclick: () => { outbox.tries = 0; outbox.flush(); } }, "Send now"));
    } else if (outbox.inflight) {
      sendStatus.append(`Sending ${outbox.unsent} label(s)…`);
    } else if (outbox.unsent) {
      sendStatus.append(`${outbox.unsent} label(s) to send`);
    } else {
      sendStatus.className = "muted";
      sendStatus.append("All labels sent");
    }
    if (outbox.refused.length) {
      sendStatus.append(h("div", { class: "error", id: "label-refused" },
        `${outbox.refused.length} label(s) refused by the server and not applied: `,
        outbox.refused.slice(-5).map((e) => `${e.item_id} → ${e.label} (${e.reason})`).join("; ")));
    }
  }

  function itemView(item) {
    const cls = classes();
    const current = st.given.get(item.item_id);
    const frame = h("div", { class: "label-frame", id: "label-frame" }, h("span", { class: "muted" }, "loading…"));
    const guess = item.guess
      ? h("p", { class: "label-guess", id: "label-guess" }, "Model's guess: ", h("strong", {}, item.guess),
        ` (${pct(item.confidence)})`, " — ", h("kbd", {}, "Enter"), " accepts it")
      : h("p", { class: "label-guess muted", id: "label-guess" }, st.queue.round === 1 || st.queue.round === null
        ? "No guess yet: the model is fitted once this first batch is labeled" : "No guess for this item");
    const buttons = h("div", { class: "label-classes", id: "label-classes" }, cls.map((c, n) => h("button", {
      type: "button", class: c === current ? "" : "secondary", "data-class": c,
      onclick: () => give([item.item_id], c, performance.now()),
    }, n < 9 ? h("kbd", {}, String(n + 1)) : null, " ", c)));
    if (st.queue.allow_new_classes) {
      const input = h("input", { id: "label-new-class", placeholder: "new class", maxlength: 100, "aria-label": "new class" });
      const add = () => {
        const name = input.value.trim();
        if (!name) return;
        if (!ANNOTATOR.test(name)) { notice.textContent = "A class name is 1–100 printable characters without slashes."; return; }
        if (!classes().includes(name)) st.extraClasses.push(name);
        give([item.item_id], name, performance.now());
      };
      input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); add(); } ev.stopPropagation(); });
      buttons.append(h("span", { class: "label-new" }, input, h("button", { type: "button", class: "secondary", onclick: add }, "Add")));
    }
    const status = st.relabel.has(item.item_id)
      ? h("p", { class: "error", id: "label-status" }, `Undone: the server still has “${st.relabel.get(item.item_id)}” — pick a class to change it`)
      : current !== undefined ? h("p", { class: "muted", id: "label-status" }, `Labeled: ${current}`) : h("p", { id: "label-status" });
    const position = st.items.indexOf(item);
    return h("div", { class: "label-single" },
      h("div", { class: "label-main" },
        frame,
        h("div", { class: "label-caption" },
          h("button", { type: "button", class: "secondary", onclick: () => move(-1, performance.now()), "aria-label": "previous" }, "←"),
          h("span", { class: "label-name", id: "label-name" }, item.name),
          h("span", { class: "muted" }, ` ${position + 1} / ${st.items.length}`),
          item.reason ? h("span", { class: "muted" }, ` · asked: ${item.reason}`) : null,
          h("button", { type: "button", class: "secondary", onclick: () => move(1, performance.now()), "aria-label": "next" }, "→")),
        guess, buttons, status),
      h("aside", { class: "label-side" },
        h("h2", {}, "Similar images"),
        h("div", { class: "label-similar", id: "label-similar" }, h("span", { class: "muted" }, "…")),
        h("h2", {}, "Queue"),
        queueList()));
  }

  function queueList() {
    return h("ol", { class: "label-queue", id: "label-queue" }, st.items.map((item, n) => {
      const given = st.given.get(item.item_id);
      return h("li", {
        class: [n === st.index ? "current" : "", given !== undefined || st.elsewhere.has(item.item_id) ? "done" : "", st.relabel.has(item.item_id) ? "relabel" : ""].join(" ").trim(),
        "data-item": item.item_id,
      }, h("button", { type: "button", class: "link", onclick: () => show(n, performance.now()) }, item.name),
      given !== undefined ? h("span", { class: "muted" }, ` ${given}`)
        : st.elsewhere.has(item.item_id) ? h("span", { class: "muted" }, " labeled by someone else") : null);
    }));
  }

  function renderBody() {
    clear(body);
    notice.textContent = "";
    renderProgress();
    if (!st.queue) return;
    if (st.waiting) { body.append(waitingView()); return; }
    if (st.grid) { body.append(gridView()); return; }
    const item = st.items[st.index];
    if (item) body.append(itemView(item));
  }

  function waitingView() {
    const q = st.queue;
    if (q.state === "labeled") {
      return h("div", { class: "card", id: "label-finished" },
        h("h2", {}, "Labeling finished"),
        h("p", {}, `People labeled ${q.budget.labeled} item(s); the model labeled the rest it is sure of. The run goes on.`),
        h("p", {}, h("a", { href: `#/runs/${encodeURIComponent(q.run_id)}`, id: "label-run-link" }, "Open the run")));
    }
    if (q.state === "failed") {
      return h("div", { class: "card error", id: "label-failed" }, "The labeling failed; see ",
        h("a", { href: `#/runs/${encodeURIComponent(q.run_id)}` }, "the run"), " for the reason.");
    }
    return h("div", { class: "card", id: "label-waiting" },
      h("h2", {}, "Waiting for the model…"),
      h("p", { class: "muted" }, "Every item of this batch is labeled. The model is fitted on the labels and picks the next items; they appear here."),
      outbox.unsent ? h("p", {}, `${outbox.unsent} label(s) still to send.`) : null);
  }

  // ---------------------------------------------------------------- single item

  async function show(index, t0) {
    if (!st.items.length) return;
    st.index = Math.max(0, Math.min(index, st.items.length - 1));
    const item = st.items[st.index];
    const token = ++st.showToken;
    if (st.grid || st.waiting) return;
    renderBody();
    const frame = document.getElementById("label-frame");
    let entry = images.ready(item.item_id);
    if (!entry) {
      try { entry = await images.get(item.item_id, item.name); } catch (err) {
        if (token === st.showToken) frame.replaceChildren(h("p", { class: "error" }, `The image did not load: ${err.message}`));
        return;
      }
    }
    if (token !== st.showToken || !frame.isConnected) return;
    entry.img.id = "label-image";
    entry.img.dataset.item = item.item_id;
    frame.replaceChildren(entry.img);
    prefetch(st.index);
    if (t0 !== undefined) {
      requestAnimationFrame(() => requestAnimationFrame(() => {
        if (token !== st.showToken) return;
        performance.measure(MEASURE, { start: t0, end: performance.now(), detail: { item: item.item_id } });
      }));
    }
    later(() => { if (token === st.showToken) showSimilar(item); }, SIMILAR_DELAY_MS);
  }

  function prefetch(index) {
    const keep = new Set();
    for (let n = index; n < Math.min(st.items.length, index + PREFETCH_AHEAD + 1); n++) {
      const item = st.items[n];
      keep.add(item.item_id);
      images.get(item.item_id, item.name).catch(() => {});
    }
    if (index > 0) keep.add(st.items[index - 1].item_id);
    images.trim(keep);
  }

  async function showSimilar(item) {
    const box = document.getElementById("label-similar");
    if (!box) return;
    let found = st.similar.get(item.item_id);
    if (!found) {
      found = api(`/labeler/datasets/${encodeURIComponent(datasetId)}/similar?item=${encodeURIComponent(item.item_id)}&k=${SIMILAR_K + 1}`);
      st.similar.set(item.item_id, found);
      found.catch(() => st.similar.delete(item.item_id));
    }
    let result;
    try { result = await found; } catch (err) {
      if (box.isConnected) box.replaceChildren(h("span", { class: "muted" }, `No similar images: ${err.message}`));
      return;
    }
    if (!box.isConnected || st.items[st.index] !== item) return;
    const others = result.neighbours.filter((n) => n.item_id !== item.item_id).slice(0, SIMILAR_K);
    box.replaceChildren(...others.map((n) => {
      const thumb = h("img", { alt: n.name, class: "thumb" });
      images.get(n.item_id, n.name).then((e) => { thumb.src = e.url; }).catch(() => {});
      const known = st.given.get(n.item_id);
      return h("figure", { class: "label-neighbour", "data-item": n.item_id }, thumb,
        h("figcaption", {}, h("span", { class: "label-name" }, n.name), h("br"),
          h("span", { class: "muted" }, `similarity ${n.similarity.toFixed(2)}`), known ? ` · ${known}` : null));
    }));
    if (!others.length) box.replaceChildren(h("span", { class: "muted" }, "none"));
  }

  // ---------------------------------------------------------------- labeling

  /** An item that waits for a label here: not given on this page, not labeled by someone else meanwhile. */
  function isOpen(item) {
    return !st.given.has(item.item_id) && !st.elsewhere.has(item.item_id);
  }

  function nextOpen(from) {
    for (let k = 1; k <= st.items.length; k++) {
      const n = (from + k) % st.items.length;
      if (isOpen(st.items[n])) return n;
    }
    return -1;
  }

  /** Label items (one, or the grid's selection) with ``label``; t0: when the key or click came. */
  function give(itemIds, label, t0) {
    const batchId = st.queue.batch_id;
    const changes = [];
    for (const id of itemIds) {
      // what the item holds now: the label given here, or the one sent and undone (the server has it)
      const before = st.given.has(id) ? st.given.get(id) : (st.relabel.has(id) ? st.relabel.get(id) : null);
      st.relabel.delete(id);
      st.given.set(id, label);
      if (before === label) continue; // the same label again changes nothing
      const key = ++changeCount;
      changes.push({ key, item_id: id, before, label, batch_id: batchId });
      outbox.push({ key, dataset_id: datasetId, batch_id: batchId, item_id: id, label });
    }
    if (changes.length) st.history.push({ changes });
    if (itemIds.length > 1) outbox.flush(); else outbox.schedule();
    advance(t0);
  }

  function advance(t0) {
    const next = nextOpen(st.grid ? -1 : st.index);
    if (next < 0) { batchDone(); return; }
    if (st.grid) { renderBody(); return; }
    show(next, t0);
  }

  function undo(t0) {
    const step = st.history.pop();
    if (!step) { notice.textContent = "Nothing to undo."; return; }
    let firstIndex = -1;
    for (const change of [...step.changes].reverse()) {
      const { item_id: id, before } = change;
      const takenBack = outbox.takeBack(change.key);
      if (takenBack) {
        // never sent: as if it had not been given
        if (before === null) st.given.delete(id); else st.given.set(id, before);
      } else if (before !== null) {
        // sent already: send the label it had before again (the last accepted wins)
        st.given.set(id, before);
        outbox.push({ dataset_id: datasetId, batch_id: change.batch_id, item_id: id, label: before });
      } else {
        // sent, and the item had no label before: it waits for a new one
        st.given.delete(id);
        st.relabel.set(id, change.label);
      }
      const n = st.items.findIndex((i) => i.item_id === id);
      if (n >= 0) firstIndex = n;
    }
    outbox.schedule();
    if (st.waiting && firstIndex >= 0) st.waiting = false;
    if (st.grid) { renderBody(); return; }
    if (firstIndex >= 0) show(firstIndex, t0); else renderBody();
  }

  function move(delta, t0) {
    if (!st.items.length || st.waiting) return;
    show((st.index + delta + st.items.length) % st.items.length, t0);
  }

  // ---------------------------------------------------------------- grid

  function gridView() {
    const allOpen = st.items.filter(isOpen);
    const open = allOpen.slice(0, GRID_PAGE);
    const withGuess = open.filter((i) => i.guess);
    const count = h("span", { id: "label-grid-count" }, `${[...st.selected].filter((id) => open.some((i) => i.item_id === id)).length} selected`);
    const cards = open.map((item) => {
      const selected = st.selected.has(item.item_id);
      const thumb = h("img", { alt: item.name, class: "thumb" });
      images.get(item.item_id, item.name).then((e) => { thumb.src = e.url; }).catch(() => {});
      const card = h("button", {
        type: "button", class: `label-card${selected ? " selected" : ""}${item.guess ? "" : " noguess"}`,
        "data-item": item.item_id, "aria-pressed": selected ? "true" : "false", disabled: item.guess ? null : true,
        onclick: () => {
          if (st.selected.has(item.item_id)) st.selected.delete(item.item_id); else st.selected.add(item.item_id);
          renderBody();
        },
      }, thumb, h("span", { class: "label-name" }, item.name),
      item.guess ? h("span", {}, h("strong", {}, item.guess), ` ${pct(item.confidence)}`) : h("span", { class: "muted" }, "no guess"));
      return card;
    });
    return h("div", { class: "label-grid-mode" },
      h("div", { class: "label-grid-tools" },
        h("button", { type: "button", id: "label-confirm", onclick: () => confirmGrid(performance.now()), disabled: st.selected.size ? null : true },
          "Confirm the selected guesses (Enter)"),
        h("button", { type: "button", class: "secondary", onclick: () => { withGuess.forEach((i) => st.selected.add(i.item_id)); renderBody(); } }, "Select all"),
        h("button", { type: "button", class: "secondary", onclick: () => { st.selected.clear(); renderBody(); } }, "Select none"),
        h("button", { type: "button", class: "secondary", onclick: () => toggleGrid() }, "One by one (g)"),
        count),
      allOpen.length > open.length ? h("p", { class: "muted" }, `The first ${open.length} of ${allOpen.length} items left; the next ones follow.`) : null,
      withGuess.length ? null : h("p", { class: "muted" }, "The model has no guesses for these items yet (the first batch): label them one by one."),
      h("div", { class: "label-grid", id: "label-grid" }, cards));
  }

  function selectGuesses() {
    st.selected = new Set(st.items.filter((i) => i.guess && isOpen(i)).slice(0, GRID_PAGE).map((i) => i.item_id));
  }

  function toggleGrid() {
    st.grid = !st.grid;
    if (st.grid) {
      selectGuesses();
      renderBody();
    } else {
      const current = st.items[st.index];
      const n = current && isOpen(current) ? st.index : nextOpen(st.index);
      show(n < 0 ? 0 : n);
    }
  }

  function confirmGrid(t0) {
    const chosen = st.items.filter((i) => st.selected.has(i.item_id) && i.guess && isOpen(i));
    if (!chosen.length) return;
    // one submission: the labels of the selection are given together and sent at once
    const byLabel = new Map();
    for (const item of chosen) byLabel.set(item.item_id, item.guess);
    const batchId = st.queue.batch_id;
    const changes = [];
    for (const [id, label] of byLabel) {
      const before = st.relabel.has(id) ? st.relabel.get(id) : null;
      st.relabel.delete(id);
      st.given.set(id, label);
      const key = ++changeCount;
      changes.push({ key, item_id: id, before, label, batch_id: batchId });
      outbox.push({ key, dataset_id: datasetId, batch_id: batchId, item_id: id, label });
    }
    st.history.push({ changes });
    st.selected.clear();
    outbox.flush();
    advance(t0);
  }

  // ---------------------------------------------------------------- rounds

  function batchDone() {
    st.waiting = true;
    renderBody();
    outbox.flush();
    poll(0);
  }

  async function poll(attempt) {
    if (st.leaving) return;
    let q;
    try {
      q = await loadQueue();
    } catch (err) {
      notice.textContent = `Could not read the queue: ${err.message}`;
      later(() => poll(attempt + 1), POLL_MS[Math.min(attempt, POLL_MS.length - 1)]);
      return;
    }
    if (st.leaving || !st.waiting) return;
    const same = q.batch_id === st.queue.batch_id;
    const fresh = q.items.filter((i) => !st.given.has(i.item_id));
    if (q.state === "labeled" || q.state === "failed") {
      st.queue = q;
      renderBody();
      return;
    }
    if (q.state === "labeling" && q.items.length && (!same || (fresh.length && !outbox.unsent))) {
      start(q);
      return;
    }
    renderBody();
    later(() => poll(attempt + 1), POLL_MS[Math.min(attempt, POLL_MS.length - 1)]);
  }

  /** While labeling: the items someone else labeled meanwhile are skipped; a batch finished by others
   * (the queue moved on) is left for the next once what was given here is sent. */
  async function refresh() {
    if (st.leaving || st.waiting || !st.queue || st.queue.state !== "labeling") return;
    let q;
    try { q = await loadQueue(); } catch { return; }
    if (st.leaving || st.waiting) return;
    if (q.batch_id !== st.queue.batch_id || q.state !== "labeling") {
      if (outbox.unsent) return;
      notice.textContent = "This batch was finished (others labeled too): here is the next one.";
      start(q);
      return;
    }
    const waiting = new Set(q.items.map((i) => i.item_id));
    const before = st.elsewhere.size;
    for (const i of st.items) {
      if (!waiting.has(i.item_id) && !st.given.has(i.item_id) && !st.relabel.has(i.item_id)) st.elsewhere.add(i.item_id);
    }
    if (st.elsewhere.size === before) return;
    if (!st.items.some(isOpen)) { batchDone(); return; }
    if (st.grid) renderBody(); else show(isOpen(st.items[st.index]) ? st.index : nextOpen(st.index));
  }

  async function loadQueue() {
    return api(`/labeler/datasets/${encodeURIComponent(datasetId)}/queue`);
  }

  /** Show a queue read from the server: its batch's items (those given here already count as done). */
  function start(q) {
    const sameBatch = st.queue && st.queue.batch_id === q.batch_id;
    st.queue = q;
    if (!sameBatch) {
      st.given = new Map();
      st.relabel = new Map();
      st.elsewhere = new Set();
      st.history = [];
      st.items = q.items;
    } else {
      const known = new Set(st.items.map((i) => i.item_id));
      st.items = [...st.items, ...q.items.filter((i) => !known.has(i.item_id))];
    }
    // labels kept from an earlier visit and not yet accepted: they count as given
    for (const e of outbox.entries) if (e.batch_id === q.batch_id) st.given.set(e.item_id, e.label);
    st.waiting = false;
    st.index = 0;
    if (q.state !== "labeling" || !q.items.length) { st.waiting = true; renderBody(); if (q.state === "labeling") poll(0); return; }
    const open = nextOpen(-1);
    if (open < 0) { batchDone(); return; }
    if (st.grid) { selectGuesses(); renderBody(); return; }
    show(open);
  }

  // ---------------------------------------------------------------- keys

  function onKey(ev) {
    if (ev.defaultPrevented || ev.altKey || ev.metaKey) return;
    const target = ev.target;
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement) return;
    // Enter or Space on a focused button or link is theirs
    if ((ev.key === "Enter" || ev.key === " ") && (target instanceof HTMLButtonElement || target instanceof HTMLAnchorElement)) return;
    const t0 = ev.timeStamp > 0 ? ev.timeStamp : performance.now();
    const key = ev.key;
    if ((ev.ctrlKey && key.toLowerCase() === "z") || (!ev.ctrlKey && key === "Backspace")) {
      ev.preventDefault();
      undo(t0);
      return;
    }
    if (ev.ctrlKey || !st.queue || st.queue.state !== "labeling") return;
    if (key === "g") { ev.preventDefault(); if (!st.waiting) toggleGrid(); return; }
    if (st.waiting) return;
    if (st.grid) {
      if (key === "Enter") { ev.preventDefault(); confirmGrid(t0); }
      return;
    }
    const item = st.items[st.index];
    if (!item) return;
    if (/^[1-9]$/.test(key)) {
      const cls = classes()[Number(key) - 1];
      if (cls !== undefined) { ev.preventDefault(); give([item.item_id], cls, t0); }
    } else if (key === "Enter") {
      if (item.guess) { ev.preventDefault(); give([item.item_id], item.guess, t0); }
    } else if (key === "ArrowRight") {
      ev.preventDefault(); move(1, t0);
    } else if (key === "ArrowLeft") {
      ev.preventDefault(); move(-1, t0);
    }
  }

  // ---------------------------------------------------------------- start

  const onHide = () => outbox.leave({ stop: false });
  const onFocus = () => { refresh(); };
  document.addEventListener("keydown", onKey);
  window.addEventListener("pagehide", onHide);
  window.addEventListener("focus", onFocus); // back to the tab: what changed meanwhile
  const ticker = setInterval(() => { if (outbox.error && !outbox.error.permanent) renderSendStatus(); }, 1000);

  let dataset = null;
  try {
    dataset = await api(`/labeler/datasets/${encodeURIComponent(datasetId)}`);
    title.textContent = `Labeling ${dataset.name || datasetId}`;
  } catch (err) {
    root.append(h("p", { class: "error" }, `No dataset ${datasetId}: ${err.message}`));
  }
  renderSendStatus();
  if (dataset) {
    if (outbox.unsent) outbox.flush();
    const q = await loadQueue();
    start(q);
    const tick = () => refresh().finally(() => { if (!st.leaving) later(tick, REFRESH_MS); });
    later(tick, REFRESH_MS);
  }

  return () => {
    st.leaving = true;
    document.removeEventListener("keydown", onKey);
    window.removeEventListener("pagehide", onHide);
    window.removeEventListener("focus", onFocus);
    clearInterval(ticker);
    for (const t of timers) clearTimeout(t);
    outbox.leave({ stop: true });
    images.release();
  };
}
