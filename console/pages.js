// The console's pages other than status: requests, usage, keys, jobs, conversations, vector
// stores and instances. Each view is one or two API calls, each with a limit or a time range;
// everything they answer is written with textContent (never parsed as HTML), so a prompt, a
// key's name or a store's name is shown exactly as typed and runs nothing.
"use strict";

(function () {
  const SG = window.SG;
  const PAGE = 50;
  const DAY_MS = 86400000;

  function text(value) {
    return value === null || value === undefined || value === "" ? "–" : String(value);
  }

  function cell(tag, value) {
    const el = document.createElement(tag);
    el.textContent = text(value);
    return el;
  }

  function tableRow(values) {
    const tr = document.createElement("tr");
    values.forEach(function (v) {
      tr.appendChild(v instanceof Node ? wrap(v) : cell("td", v));
    });
    return tr;
  }

  function wrap(node) {
    const td = document.createElement("td");
    td.appendChild(node);
    return td;
  }

  // A row that opens its details on a click or Enter.
  function clickable(tr, open) {
    tr.classList.add("clickable");
    tr.tabIndex = 0;
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", function (e) {
      if (e.key === "Enter") {
        open();
      }
    });
    return tr;
  }

  function fill(tbodyId, rows, empty, columns) {
    const tbody = document.getElementById(tbodyId);
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      const td = cell("td", empty);
      td.colSpan = columns;
      td.className = "empty";
      tr.appendChild(td);
      rows = [tr];
    }
    tbody.replaceChildren.apply(tbody, rows);
  }

  // Unix seconds or an RFC 3339 string → "2026-11-23 10:00:00" (UTC).
  function when(value) {
    if (value === null || value === undefined) {
      return null;
    }
    const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    return date.toISOString().slice(0, 19).replace("T", " ");
  }

  function unixSeconds(ms) {
    return Math.floor(ms / 1000);
  }

  function number(value) {
    return value === null || value === undefined ? null : Number(value).toLocaleString("en");
  }

  function timed(label, started) {
    return label + " in " + Math.round(performance.now() - started) + " ms";
  }

  // ---------------------------------------------------------------- requests

  const requests = {
    // The filters as applied: the range is fixed when applied, so paging stays in it.
    query: null,
    // The cursors of the pages before this one (their first rows' predecessors), for "newer".
    back: [],
    before: null,
    rows: [],
  };

  function requestsFilter() {
    const now = Date.now();
    const range = Number(document.getElementById("rq-range").value);
    const params = new URLSearchParams();
    params.set("since", String(unixSeconds(now - range * 1000)));
    params.set("until", String(unixSeconds(now) + 1));
    params.set("limit", String(PAGE));
    [["rq-model", "model"], ["rq-status", "status"], ["rq-key", "key"]].forEach(function (f) {
      const value = document.getElementById(f[0]).value.trim();
      if (value) {
        params.set(f[1], value);
      }
    });
    return params;
  }

  async function loadRequests() {
    const params = new URLSearchParams(requests.query);
    if (requests.before !== null) {
      params.set("before", String(requests.before));
    }
    const started = performance.now();
    const answer = await SG.api("/api/requests?" + params.toString());
    if (!answer.ok) {
      return;
    }
    const data = answer.body.data;
    requests.rows = data;
    fill("rq-rows", data.map(function (r, i) {
      const tr = tableRow([
        when(r.created_at), r.route, r.model, r.status, r.key_id, r.provider,
        r.total_ms, r.queue_ms,
        text(r.prompt_tokens) + " / " + text(r.completion_tokens),
        r.cost_estimated ? dollars(r.cost_usd) + " (estimated)" : dollars(r.cost_usd),
        r.request_id,
      ]);
      tr.dataset.index = String(i);
      if (r.status >= 400) {
        tr.className = "failed";
      }
      return clickable(tr, function () { showRequest(i); });
    }), "no logged request matches", 11);
    document.getElementById("rq-older").disabled = !answer.body.has_more;
    document.getElementById("rq-newer").disabled = requests.back.length === 0;
    const page = requests.back.length + 1;
    document.getElementById("rq-info").textContent = timed(
      "page " + page + ": " + data.length + " rows, newest first", started);
    document.getElementById("rq-detail").hidden = true;
  }

  function showRequest(i) {
    const r = requests.rows[i];
    document.getElementById("rq-detail-id").textContent = r.request_id;
    const skip = { request_body: 1, response_body: 1 };
    const fields = Object.keys(r).filter(function (k) { return !skip[k]; });
    const rows = fields.map(function (k) {
      const tr = document.createElement("tr");
      tr.appendChild(cell("th", k));
      tr.appendChild(cell("td", r[k]));
      return tr;
    });
    const tbody = document.getElementById("rq-detail-fields");
    tbody.replaceChildren.apply(tbody, rows);
    document.getElementById("rq-request-body").textContent = body(r.request_body);
    document.getElementById("rq-response-body").textContent = body(r.response_body);
    const detail = document.getElementById("rq-detail");
    detail.hidden = false;
    detail.scrollIntoView({ block: "nearest" });
  }

  // A kept body, indented when it is JSON; said so when bodies are not kept.
  function body(value) {
    if (value === undefined || value === null) {
      return "(not kept: [log] bodies is off)";
    }
    try {
      return JSON.stringify(JSON.parse(value), null, 2);
    } catch (e) {
      return value;
    }
  }

  document.getElementById("rq-filter").addEventListener("submit", function (e) {
    e.preventDefault();
    requests.query = requestsFilter().toString();
    requests.back = [];
    requests.before = null;
    loadRequests();
  });
  document.getElementById("rq-older").addEventListener("click", function () {
    const last = requests.rows[requests.rows.length - 1];
    if (last) {
      requests.back.push(requests.before);
      requests.before = last.id;
      loadRequests();
    }
  });
  document.getElementById("rq-newer").addEventListener("click", function () {
    if (requests.back.length > 0) {
      requests.before = requests.back.pop();
      loadRequests();
    }
  });
  SG.page("requests", function () {
    if (requests.query === null) {
      requests.query = requestsFilter().toString();
    }
    loadRequests();
  });

  // ---------------------------------------------------------------- usage

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attributes, parent) {
    const el = document.createElementNS(SVG, tag);
    Object.keys(attributes).forEach(function (k) { el.setAttribute(k, attributes[k]); });
    parent.appendChild(el);
    return el;
  }

  // Calls and errors by day as bars: an inline SVG made with DOM calls, no library.
  function drawUsage(days) {
    const chart = document.getElementById("us-chart");
    chart.replaceChildren();
    const width = 800;
    const height = 220;
    const pad = { left: 56, right: 8, top: 10, bottom: 28 };
    const max = days.reduce(function (m, d) { return Math.max(m, d.calls); }, 1);
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    svg("line", { x1: pad.left, y1: pad.top + plotH, x2: width - pad.right, y2: pad.top + plotH, class: "axis" }, chart);
    svg("text", { x: pad.left - 6, y: pad.top + 10, class: "tick end" }, chart).textContent = number(max);
    svg("text", { x: pad.left - 6, y: pad.top + plotH, class: "tick end" }, chart).textContent = "0";
    if (days.length === 0) {
      svg("text", { x: pad.left + plotW / 2, y: pad.top + plotH / 2, class: "tick middle" }, chart)
        .textContent = "no calls in this range";
      return;
    }
    const slot = plotW / days.length;
    const barW = Math.max(1, slot * 0.7);
    const every = Math.ceil(days.length / 10);
    days.forEach(function (d, i) {
      const x = pad.left + i * slot + (slot - barW) / 2;
      const h = plotH * d.calls / max;
      const bar = svg("rect", { x: x, y: pad.top + plotH - h, width: barW, height: h, class: "bar-calls" }, chart);
      svg("title", {}, bar).textContent = d.day + ": " + d.calls + " calls, " + d.errors + " errors";
      const e = plotH * d.errors / max;
      svg("rect", { x: x, y: pad.top + plotH - e, width: barW, height: e, class: "bar-errors" }, chart);
      if (i % every === 0) {
        svg("text", { x: x + barW / 2, y: height - 10, class: "tick middle" }, chart).textContent = d.day.slice(5);
      }
    });
  }

  // Dollars to the micro-dollar; "–" when no call was priced. Unpriced calls are counted
  // beside it, so a model without a price never looks free.
  function dollars(usd) {
    return usd === null || usd === undefined ? null : "$" + Number(usd).toFixed(6);
  }

  function totalsRow(name, t) {
    return tableRow([name, number(t.calls), number(t.errors), number(t.prompt_tokens),
      number(t.completion_tokens), number(t.total_tokens), dollars(t.cost_usd),
      number(t.unpriced_calls)]);
  }

  async function loadUsage() {
    const days = Number(document.getElementById("us-range").value);
    const group = document.getElementById("us-group").value;
    const now = Date.now();
    // Whole UTC days, today included: at most 90 of them.
    const since = Math.floor(now / DAY_MS) * DAY_MS - (Math.min(days, 90) - 1) * DAY_MS;
    const range = "since=" + unixSeconds(since) + "&until=" + (unixSeconds(now) + 1);
    const started = performance.now();
    const byDay = await SG.api("/api/usage?group_by=day&" + range);
    const byGroup = await SG.api("/api/usage?group_by=" + group + "&" + range);
    if (!byDay.ok || !byGroup.ok) {
      return;
    }
    // Every day of the range, those without calls as zero.
    const seen = {};
    byDay.body.data.forEach(function (d) { seen[d.day] = d; });
    const all = [];
    for (let t = since; t <= now; t += DAY_MS) {
      const day = new Date(t).toISOString().slice(0, 10);
      all.push(seen[day] || { day: day, calls: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, cost_usd: null, unpriced_calls: 0 });
    }
    drawUsage(all);
    fill("us-days", byDay.body.data.slice().reverse().map(function (d) {
      return totalsRow(d.day, d);
    }), "no calls in this range", 8);
    document.getElementById("us-group-name").textContent = group;
    document.getElementById("us-group-head").textContent = group;
    fill("us-groups", byGroup.body.data.map(function (t) {
      return totalsRow(t[group], t);
    }), "no calls in this range", 8);
    document.getElementById("us-info").textContent = timed(
      all.length + " days from " + all[0].day + " (UTC)", started);
  }

  document.getElementById("us-filter").addEventListener("submit", function (e) {
    e.preventDefault();
    loadUsage();
  });
  SG.page("usage", loadUsage);

  // ---------------------------------------------------------------- keys

  // The pages of the admin key (keys, instances) each have a form that asks for it; the key
  // is kept in this tab under its own name, apart from the key the other pages use.
  function askForAdmin(formId, refused) {
    document.getElementById(formId).hidden = false;
    SG.problem(refused ? "That admin key was refused." : "");
  }

  // GET `path` with the admin key: its answer, or null when there is no admin key yet or it
  // was refused (then forgotten), and the page's form asks for one.
  async function adminGet(path, formId) {
    if (!sessionStorage.getItem(SG.ADMIN)) {
      askForAdmin(formId, false);
      return null;
    }
    const answer = await SG.api(path, { admin: true });
    if (answer.status === 401 || answer.status === 403) {
      sessionStorage.removeItem(SG.ADMIN);
      askForAdmin(formId, true);
      return null;
    }
    if (!answer.ok) {
      return null;
    }
    document.getElementById(formId).hidden = true;
    return answer;
  }

  // The form `formId` keeps the admin key typed into `inputId`, then runs `load`.
  function takeAdminKey(formId, inputId, load) {
    document.getElementById(formId).addEventListener("submit", function (e) {
      e.preventDefault();
      const value = document.getElementById(inputId).value.trim();
      if (value) {
        sessionStorage.setItem(SG.ADMIN, value);
      }
      document.getElementById(inputId).value = "";
      load();
    });
  }

  async function loadKeys() {
    const answer = await adminGet("/admin/keys", "admin-form");
    // Keys are made only by whoever may list them.
    document.getElementById("kc-form").hidden = answer === null;
    if (answer === null) {
      return;
    }
    const rows = answer.body.data.slice().reverse().map(function (k) {
      let action = "";
      if (k.status === "active") {
        action = document.createElement("button");
        action.type = "button";
        action.className = "revoke";
        action.dataset.id = String(k.id);
        action.textContent = "revoke";
        action.addEventListener("click", function () { revoke(action, k.id); });
      }
      const tr = tableRow([k.id, k.name, k.prefix, k.status, k.models ? k.models.join(", ") : "all",
        k.rpm, k.tpm, k.max_in_flight, when(k.expires_at), when(k.created_at),
        when(k.last_used_at), action]);
      tr.dataset.id = String(k.id);
      if (k.status !== "active") {
        tr.className = "inactive";
      }
      return tr;
    });
    fill("keys-rows", rows, "no key yet: this server is in development mode until one is made", 12);
  }

  // The first click asks, the second revokes: a revoked key cannot be brought back.
  async function revoke(button, id) {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "really revoke?";
      return;
    }
    button.disabled = true;
    const answer = await SG.api("/admin/keys/" + id, { method: "DELETE", admin: true });
    if (answer.ok) {
      loadKeys();
    }
  }

  function limit(id) {
    const value = document.getElementById(id).value.trim();
    return value ? Number(value) : undefined;
  }

  document.getElementById("kc-form").addEventListener("submit", async function (e) {
    e.preventDefault();
    const models = document.getElementById("kc-models").value.split(",")
      .map(function (m) { return m.trim(); })
      .filter(function (m) { return m; });
    const request = {
      name: document.getElementById("kc-name").value,
      models: models.length ? models : undefined,
      rpm: limit("kc-rpm"),
      tpm: limit("kc-tpm"),
      max_in_flight: limit("kc-inflight"),
    };
    const answer = await SG.api("/admin/keys", { method: "POST", body: request, admin: true });
    if (!answer.ok) {
      return;
    }
    document.getElementById("kc-secret-name").textContent = answer.body.name;
    document.getElementById("kc-secret-value").textContent = answer.body.key;
    document.getElementById("kc-secret").hidden = false;
    document.getElementById("kc-form").reset();
    loadKeys();
  });
  takeAdminKey("admin-form", "admin-input", loadKeys);
  SG.page("keys", function () {
    // A secret is shown once: not again when the page is opened later.
    document.getElementById("kc-secret").hidden = true;
    document.getElementById("kc-secret-value").textContent = "";
    loadKeys();
  });

  // ---------------------------------------------------------------- jobs, conversations

  function errorText(error) {
    if (error === null || error === undefined) {
      return null;
    }
    return typeof error === "object" ? error.message || JSON.stringify(error) : error;
  }

  SG.page("jobs", async function () {
    const answer = await SG.api("/api/jobs?limit=100");
    if (answer.ok) {
      fill("jobs-rows", answer.body.data.map(function (j) {
        return tableRow([j.id, j.status, j.model, j.attempts + " / " + j.max_attempts,
          when(j.created_at), j.wait_ms, j.run_ms, errorText(j.error)]);
      }), "no job", 8);
    }
  });

  SG.page("conversations", async function () {
    const answer = await SG.api("/api/conversations?limit=100");
    if (answer.ok) {
      fill("conversations-rows", answer.body.data.map(function (c) {
        return tableRow([c.id, c.title, c.model, when(c.created_at)]);
      }), "no conversation", 4);
    }
  });

  // ---------------------------------------------------------------- vector stores

  const stores = {
    // Every store shown so far, page after page; the next page starts after the last.
    rows: [],
    after: null,
  };

  // The admin key when this tab holds one (it sees every key's stores), else the tab's key
  // (its own stores; in development mode, those made without a key).
  function readsAsAdmin() {
    return sessionStorage.getItem(SG.ADMIN) !== null;
  }

  function counts(c) {
    return [c.completed, c.in_progress, c.failed, c.cancelled, c.total].map(text).join(" / ");
  }

  function storeRow(v, i) {
    const tr = tableRow([v.id, v.name, v.status, counts(v.file_counts), number(v.usage_bytes),
      when(v.created_at), when(v.last_active_at), when(v.expires_at)]);
    tr.dataset.id = v.id;
    if (v.status === "expired") {
      tr.className = "inactive";
    }
    return clickable(tr, function () { showStore(i); });
  }

  // One page of PAGE stores, newest first: the first, or the one after those shown ("more").
  async function loadStores(more) {
    const params = new URLSearchParams({ limit: String(PAGE), order: "desc" });
    if (more && stores.after !== null) {
      params.set("after", stores.after);
    }
    const admin = readsAsAdmin();
    const started = performance.now();
    const answer = await SG.api("/v1/vector_stores?" + params.toString(), { admin: admin });
    if (!answer.ok) {
      return;
    }
    const page = answer.body;
    stores.rows = more ? stores.rows.concat(page.data) : page.data;
    stores.after = page.last_id || stores.after;
    fill("vs-rows", stores.rows.map(storeRow), "no vector store", 8);
    document.getElementById("vs-more").disabled = !page.has_more;
    const reader = admin ? "the admin key: every key's stores" : "this tab's key: its own stores";
    document.getElementById("vs-info").textContent =
      timed(stores.rows.length + " shown", started) + ", read with " + reader + ".";
    if (!more) {
      document.getElementById("vs-detail").hidden = true;
    }
  }

  // A store's files: the newest 100 (the most one call answers), with the same key as the list.
  async function showStore(i) {
    const v = stores.rows[i];
    const path = "/v1/vector_stores/" + encodeURIComponent(v.id) + "/files?limit=100&order=desc";
    const started = performance.now();
    const answer = await SG.api(path, { admin: readsAsAdmin() });
    if (!answer.ok) {
      return;
    }
    document.getElementById("vs-detail-name").textContent = text(v.name);
    document.getElementById("vs-detail-id").textContent = v.id;
    const files = answer.body.data;
    fill("vs-files", files.map(function (f) {
      const attributes = f.attributes && Object.keys(f.attributes).length
        ? JSON.stringify(f.attributes) : null;
      return tableRow([f.id, f.status, number(f.usage_bytes), when(f.created_at),
        errorText(f.last_error), attributes]);
    }), "no file in this store", 6);
    document.getElementById("vs-files-info").textContent = timed((answer.body.has_more
      ? "the newest " + files.length + " of " + v.file_counts.total + " files"
      : files.length + (files.length === 1 ? " file" : " files")) + ", newest first", started);
    const detail = document.getElementById("vs-detail");
    detail.hidden = false;
    detail.scrollIntoView({ block: "nearest" });
  }

  document.getElementById("vs-more").addEventListener("click", function () {
    loadStores(true);
  });
  SG.page("vector-stores", function () { loadStores(false); });

  // ---------------------------------------------------------------- instances

  async function loadInstances() {
    const answer = await adminGet("/admin/instances", "inst-admin-form");
    if (answer === null) {
      return;
    }
    const data = answer.body.data;
    fill("inst-rows", data.map(function (n) {
      const tr = tableRow([n.id, n.this ? "this one" : null, n.host, n.listen, n.version,
        when(n.started_at), when(n.renewed_at), when(n.lease_until)]);
      tr.dataset.id = n.id;
      if (n.this) {
        tr.className = "this";
      }
      return tr;
    }), "no live instance", 8);
    // Only SQLite answers an instance without a lease: it serves a database of its own.
    const leaseless = data.some(function (n) { return n.lease_until === null; });
    document.getElementById("inst-info").textContent = leaseless
      ? "No lease: this server keeps its data in SQLite, so it is the only instance."
      : data.length + " live, each holding a lease it renews.";
  }

  takeAdminKey("inst-admin-form", "inst-admin-input", loadInstances);
  SG.page("instances", loadInstances);
}());
