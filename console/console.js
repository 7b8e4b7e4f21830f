// The console's shell and its status page: the key, the pages (one per #hash), and one
// GET /api/status a second while the status page is shown, its numbers written with
// textContent (never parsed as HTML) and two charts of the last 15 minutes drawn on canvas.
// The other pages are in pages.js, which uses window.SG from here.
"use strict";

(function () {
  const REFRESH_MS = 1000;
  const KEY = "syncgate.key";
  const ADMIN = "syncgate.admin";
  const SERIES = ["t_ms", "workers_busy", "queue_depth", "requests_per_s", "shed_per_s"];

  // Anything that goes wrong in the page is shown in it (and read by the browser test).
  let problems = 0;
  function note(text) {
    problems += 1;
    const box = document.getElementById("page-errors");
    if (box) {
      box.textContent += text + "\n";
      box.hidden = false;
    }
    document.documentElement.dataset.problems = String(problems);
  }
  document.addEventListener("securitypolicyviolation", function (e) {
    note("CSP violation: " + e.violatedDirective + " " + e.blockedURI);
  });
  window.addEventListener("error", function (e) {
    note("error: " + e.message);
  });
  window.addEventListener("unhandledrejection", function (e) {
    note("unhandled: " + e.reason);
  });

  const history = { capacity: 900 };
  SERIES.forEach(function (name) { history[name] = []; });
  let since = null;
  let polls = 0;
  // Polling pauses while the page waits for a key, and starts again when one is given.
  let waitingForKey = false;

  function show(field, value) {
    const text = value === null || value === undefined ? "–" : String(value);
    document.querySelectorAll('[data-field="' + field + '"]').forEach(function (el) {
      el.textContent = text;
    });
  }

  function fixed(n) {
    return n === null || n === undefined ? null : Number(n).toFixed(n >= 100 ? 0 : 2);
  }

  function problem(text) {
    const el = document.getElementById("problem");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    cells.forEach(function (cell, i) {
      const td = document.createElement(i === 0 ? "th" : "td");
      td.textContent = cell === null || cell === undefined ? "–" : String(cell);
      tr.appendChild(td);
    });
    return tr;
  }

  function render(s) {
    document.getElementById("open-banner").hidden = !s.open_access;
    show("updated", new Date(s.time_ms).toLocaleTimeString());
    show("workers_busy", s.workers.busy);
    show("workers_total", s.workers.total);
    show("streams_open", s.streams_open);
    show("queue_depth", s.queue.depth);
    show("queue_capacity", s.queue.capacity);
    const oldest = s.queue.oldest_wait_ms;
    show("oldest_wait", oldest === null ? "none waiting"
      : oldest >= 1000 ? (oldest / 1000).toFixed(1) + " s" : oldest.toFixed(1) + " ms");
    show("retry_after", s.retry_after_s + " s");
    show("connections_open", s.connections.open);
    show("connections_max", s.connections.max);
    show("ready", s.ready.status);
    document.querySelectorAll('[data-field="ready"]').forEach(function (el) {
      el.classList.toggle("ok", s.ready.ok);
      el.classList.toggle("not-ok", !s.ready.ok);
    });
    const rates = s.rates;
    if (rates) {
      show("requests_per_s", fixed(rates.requests_per_s));
      const reasons = Object.keys(rates.shed_per_s);
      const total = reasons.reduce(function (sum, r) { return sum + rates.shed_per_s[r]; }, 0);
      show("shed_per_s", fixed(total));
      const busy = reasons.filter(function (r) { return rates.shed_per_s[r] > 0; });
      show("shed_reasons", busy.length
        ? busy.map(function (r) { return r + " " + fixed(rates.shed_per_s[r]); }).join(", ")
        : "none");
      show("rate_window", Math.round(rates.window_s) + " s");
    }
    const latency = s.latency_ms;
    if (latency) {
      show("latency_window", Math.round(latency.window_s) + " s");
      ["overhead", "upstream"].forEach(function (kind) {
        ["p50", "p95", "p99", "count"].forEach(function (q) {
          show(kind + "_" + q, q === "count" ? latency[kind][q] : fixed(latency[kind][q]));
        });
      });
    }
    const rejected = Object.keys(s.rejected_total).map(function (reason) {
      return row([reason, s.rejected_total[reason]]);
    });
    document.getElementById("rejected-rows").replaceChildren.apply(
      document.getElementById("rejected-rows"), rejected);
    const providers = s.providers.map(function (p) {
      return row([p.name, p.in_flight, p.max_concurrency === null ? "no cap" : p.max_concurrency]);
    });
    document.getElementById("provider-rows").replaceChildren.apply(
      document.getElementById("provider-rows"), providers);
    show("log_queue", s.request_log.queue_depth);
    show("log_dropped", s.request_log.dropped_total);
  }

  function merge(h) {
    history.capacity = h.capacity;
    SERIES.forEach(function (name) {
      const column = history[name];
      h[name].forEach(function (v) { column.push(v); });
      column.splice(0, Math.max(0, column.length - history.capacity));
    });
    const n = history.t_ms.length;
    if (n > 0) {
      since = history.t_ms[n - 1];
    }
  }

  // The charts' width in samples: the last minute at first, growing to the whole ring.
  function span(n) {
    return Math.min(history.capacity, Math.max(60, n));
  }

  // One chart: each series a line over the last 15 minutes, the y axis from 0 to the largest.
  function draw(canvasId, names, colors) {
    const canvas = document.getElementById(canvasId);
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(100, canvas.clientWidth) * ratio;
    const height = Math.max(60, canvas.clientHeight) * ratio;
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext("2d");
    const css = getComputedStyle(document.documentElement);
    ctx.clearRect(0, 0, width, height);
    let max = 1;
    names.forEach(function (name) {
      history[name].forEach(function (v) { max = Math.max(max, v); });
    });
    const pad = 18 * ratio;
    const plotH = height - 2 * pad;
    ctx.strokeStyle = css.getPropertyValue("--line").trim() || "#ddd";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(pad, height - pad);
    ctx.lineTo(width, height - pad);
    ctx.stroke();
    ctx.fillStyle = css.getPropertyValue("--muted").trim() || "#666";
    ctx.font = (11 * ratio) + "px sans-serif";
    ctx.fillText(String(Number(max.toFixed(2))), 2, pad - 4 * ratio);
    ctx.fillText("0", 2, height - pad);
    const n = history.t_ms.length;
    const slots = span(n);
    names.forEach(function (name, i) {
      const values = history[name];
      ctx.strokeStyle = css.getPropertyValue(colors[i]).trim() || "#000";
      ctx.lineWidth = 1.5 * ratio;
      ctx.beginPath();
      values.forEach(function (v, j) {
        const x = pad + (width - pad) * (slots - n + j) / Math.max(1, slots - 1);
        const y = height - pad - plotH * v / max;
        if (j === 0) {
          ctx.moveTo(x, y);
        } else {
          ctx.lineTo(x, y);
        }
      });
      ctx.stroke();
    });
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function askForKey() {
    waitingForKey = true;
    document.getElementById("key-form").hidden = false;
    problem(sessionStorage.getItem(KEY) ? "That key was refused." : "");
  }

  // One call to the server's API with the key (or the admin key); the JSON it answered.
  async function api(path, options) {
    const opts = options || {};
    const headers = {};
    const key = sessionStorage.getItem(opts.admin ? ADMIN : KEY);
    if (key) {
      headers.Authorization = "Bearer " + key;
    }
    const init = { method: opts.method || "GET", headers: headers, cache: "no-store" };
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    const response = await fetch(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (response.status === 401 && !opts.admin) {
      askForKey();
    } else if (!response.ok) {
      const message = body && body.error ? body.error.message : "";
      problem(init.method + " " + path.split("?")[0] + " answered " + response.status +
        (message ? ": " + message : ""));
    } else {
      problem("");
      document.getElementById("key-form").hidden = true;
    }
    return { status: response.status, ok: response.ok, body: body };
  }

  // The pages, one per #hash; pages.js adds its own with SG.page().
  const pages = {};
  let current = "status";

  function route() {
    const wanted = location.hash.replace(/^#/, "") || "status";
    current = document.querySelector('main.page[data-page="' + wanted + '"]') ? wanted : "status";
    document.querySelectorAll("main.page").forEach(function (el) {
      el.hidden = el.dataset.page !== current;
    });
    document.querySelectorAll("nav a").forEach(function (a) {
      if (a.dataset.page === current) {
        a.setAttribute("aria-current", "page");
      } else {
        a.removeAttribute("aria-current");
      }
    });
    document.documentElement.dataset.page = current;
    if (pages[current]) {
      pages[current]();
    }
  }

  window.SG = {
    api: api,
    show: show,
    problem: problem,
    // Registers what runs each time page `name` is shown.
    page: function (name, enter) { pages[name] = enter; },
    isShown: function (name) { return current === name; },
    ADMIN: ADMIN,
  };

  async function poll() {
    if (current !== "status") {
      setTimeout(poll, REFRESH_MS);
      return;
    }
    try {
      const url = since === null ? "/api/status" : "/api/status?since=" + since;
      const response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401) {
        askForKey();
        return;
      }
      if (!response.ok) {
        problem("/api/status answered " + response.status);
        return;
      }
      const status = await response.json();
      problem("");
      document.getElementById("key-form").hidden = true;
      render(status);
      merge(status.history);
      const slots = span(history.t_ms.length);
      show("chart_span", slots >= 120 ? Math.round(slots / 60) + " min" : slots + " s");
      draw("chart-load", ["workers_busy", "queue_depth"], ["--s1", "--s2"]);
      draw("chart-rates", ["requests_per_s", "shed_per_s"], ["--s3", "--s4"]);
      polls += 1;
      document.documentElement.dataset.polls = String(polls);
    } catch (e) {
      problem("cannot reach the server: " + e.message);
    } finally {
      if (!waitingForKey) {
        setTimeout(poll, REFRESH_MS);
      }
    }
  }

  document.getElementById("key-form").addEventListener("submit", function (e) {
    e.preventDefault();
    const value = document.getElementById("key-input").value.trim();
    if (value) {
      sessionStorage.setItem(KEY, value);
    } else {
      sessionStorage.removeItem(KEY);
    }
    since = null;
    SERIES.forEach(function (name) { history[name] = []; });
    if (waitingForKey) {
      waitingForKey = false;
      poll();
    }
    if (current !== "status") {
      route();
    }
  });

  window.addEventListener("hashchange", route);
  // pages.js (deferred, after this file) has registered its pages by then.
  document.addEventListener("DOMContentLoaded", route);
  poll();
}());
