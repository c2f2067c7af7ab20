/*
 * twisted-forward admin page.
 *
 * Plain JavaScript, no library, nothing fetched from anywhere but this
 * proxy.  The admin key is asked for once and kept in sessionStorage (this
 * tab only); every API call sends it as a Bearer header.  The live feed is
 * read with fetch() (EventSource cannot send a header) and parsed as
 * server-sent events.  Everything the API returns is put in the page with
 * textContent, never as HTML.
 */
(function () {
  "use strict";

  var STORE = "twisted-forward-admin-key";
  var HISTORY = 300; // seconds of live samples drawn
  var REFRESH_MS = 5000;

  var $ = function (id) { return document.getElementById(id); };
  var state = {
    key: null,
    feed: null,          // AbortController of the live feed
    samples: [],
    timers: [],
    usage: null,         // last usage answers
    openId: null,        // request_id of the conversation shown
    exchanges: []
  };

  // ------------------------------------------------------------ helpers

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        if (name === "text") { node.textContent = attrs[name]; }
        else if (name === "cls") { node.className = attrs[name]; }
        else { node.setAttribute(name, attrs[name]); }
      });
    }
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (name) { node.setAttribute(name, attrs[name]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function int(n) { return (n || 0).toLocaleString("en-US"); }
  function usd(n) {
    n = n || 0;
    if (n === 0) { return "$0"; }
    if (n >= 100) { return "$" + n.toFixed(2); }
    if (n >= 0.01) { return "$" + n.toFixed(4).replace(/0+$/, "").replace(/\.$/, ""); }
    // Small sums: two significant digits, not a row of zeros.
    var decimals = Math.min(10, 1 - Math.floor(Math.log10(n)));
    return "$" + n.toFixed(decimals);
  }
  function rate(n) { return n >= 100 ? Math.round(n).toLocaleString("en-US") : (n || 0).toFixed(1); }
  function utc(seconds) {
    return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);
  }
  function shortTime(iso) { return (iso || "").replace("T", " ").replace(/\.\d+Z$|Z$/, ""); }
  function todayUTC() { return new Date().toISOString().slice(0, 10); }

  // ------------------------------------------------------------ API

  function Unauthorised() { this.message = "unauthorised"; }

  function api(path, opts) {
    opts = opts || {};
    var headers = { "Authorization": "Bearer " + state.key };
    return fetch(path, { headers: headers, cache: "no-store", signal: opts.signal })
      .then(function (response) {
        if (response.status === 401) { throw new Unauthorised(); }
        if (!response.ok) {
          return response.json().then(function (body) {
            throw new Error((body && body.error && body.error.message) || ("HTTP " + response.status));
          });
        }
        return opts.raw ? response : response.json();
      });
  }

  function failed(error) {
    if (error instanceof Unauthorised) { logout("That key was refused."); return; }
    if (error && error.name === "AbortError") { return; }
    var where = $("feed-state");
    where.textContent = "error: " + (error && error.message ? error.message : String(error));
    where.className = "pill down";
  }

  // ------------------------------------------------------------ login

  function showLogin(message) {
    $("app").hidden = true;
    $("login").hidden = false;
    var err = $("login-error");
    err.hidden = !message;
    err.textContent = message || "";
    $("admin-key").value = "";
    $("admin-key").focus();
  }

  function login(event) {
    event.preventDefault();
    var key = $("admin-key").value.trim();
    if (!key) { return; }
    state.key = key;
    api("api/keys").then(function (keys) {
      sessionStorage.setItem(STORE, key);
      start(keys);
    }).catch(function (error) {
      state.key = null;
      showLogin(error instanceof Unauthorised ? "That key was refused." : "The proxy did not answer.");
    });
  }

  function logout(message) {
    sessionStorage.removeItem(STORE);
    state.key = null;
    if (state.feed) { state.feed.abort(); state.feed = null; }
    state.timers.forEach(clearInterval);
    state.timers = [];
    showLogin(typeof message === "string" ? message : "");
  }

  function start(keys) {
    $("login").hidden = true;
    $("app").hidden = false;
    showKeys(keys);
    fillKeyChoices(keys);
    follow();
    loadUsage();
    loadExchanges();
    state.timers.push(setInterval(function () { api("api/keys").then(showKeys).catch(failed); }, REFRESH_MS));
    state.timers.push(setInterval(loadUsage, REFRESH_MS));
    state.timers.push(setInterval(function () { if (!state.openId) { loadExchanges(); } }, 2 * REFRESH_MS));
  }

  // ------------------------------------------------------------ live feed

  function follow() {
    var controller = new AbortController();
    state.feed = controller;
    var pill = $("feed-state");
    api("api/events", { raw: true, signal: controller.signal }).then(function (response) {
      pill.textContent = "live";
      pill.className = "pill live";
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) { throw new Error("feed ended"); }
          buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
          var cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            onEvent(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
          }
          return pump();
        });
      }
      return pump();
    }).catch(function (error) {
      if (controller.signal.aborted || state.feed !== controller) { return; }
      if (error instanceof Unauthorised) { failed(error); return; }
      pill.textContent = "reconnecting…";
      pill.className = "pill down";
      setTimeout(function () { if (state.feed === controller) { follow(); } }, 2000);
    });
  }

  function onEvent(block) {
    var name = "message";
    var data = [];
    block.split("\n").forEach(function (line) {
      if (line.indexOf("event:") === 0) { name = line.slice(6).trim(); }
      else if (line.indexOf("data:") === 0) { data.push(line.slice(5).replace(/^ /, "")); }
    });
    if (!data.length) { return; }
    var value = JSON.parse(data.join("\n"));
    if (name === "history") {
      state.samples = value.slice(-HISTORY);
      if (state.samples.length) { showFigures(state.samples[state.samples.length - 1]); }
    } else if (name === "figures") {
      state.samples.push(value);
      if (state.samples.length > HISTORY) { state.samples.shift(); }
      showFigures(value);
    }
    drawLive();
  }

  function showFigures(s) {
    $("live-rps").textContent = rate(s.requests_per_s);
    $("live-tps").textContent = rate(s.tokens_per_s);
    $("live-open").textContent = int(s.open_streams);
    $("live-eps").textContent = rate(s.errors_per_s);
    $("live-requests-total").textContent = int(s.requests_total);
    $("live-tokens-total").textContent = int(s.tokens_total);
  }

  function drawLive() {
    drawSeries($("chart-rps"), "requests_per_s", "#1f6feb", $("rps-max"));
    drawSeries($("chart-tps"), "tokens_per_s", "#e8590c", $("tps-max"));
  }

  function drawSeries(canvas, field, colour, maxLabel) {
    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth || 600;
    var height = canvas.clientHeight || 140;
    if (canvas.width !== Math.round(width * ratio)) { canvas.width = Math.round(width * ratio); }
    if (canvas.height !== Math.round(height * ratio)) { canvas.height = Math.round(height * ratio); }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    var samples = state.samples;
    var max = 0;
    samples.forEach(function (s) { max = Math.max(max, s[field]); });
    var top = max > 0 ? max * 1.15 : 1;
    maxLabel.textContent = "(peak " + rate(max) + ")";
    ctx.strokeStyle = "rgba(128,128,128,0.25)";
    ctx.lineWidth = 1;
    for (var g = 1; g < 4; g++) {
      var gy = Math.round(height * g / 4) + 0.5;
      ctx.beginPath(); ctx.moveTo(0, gy); ctx.lineTo(width, gy); ctx.stroke();
    }
    if (samples.length < 2) { return; }
    var now = samples[samples.length - 1].time;
    var x = function (t) { return width - (now - t) / HISTORY * width; };
    var y = function (v) { return height - 4 - (v / top) * (height - 8); };
    ctx.beginPath();
    samples.forEach(function (s, i) {
      if (i === 0) { ctx.moveTo(x(s.time), y(s[field])); } else { ctx.lineTo(x(s.time), y(s[field])); }
    });
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.stroke();
    ctx.lineTo(x(now), height);
    ctx.lineTo(x(samples[0].time), height);
    ctx.closePath();
    ctx.globalAlpha = 0.12;
    ctx.fillStyle = colour;
    ctx.fill();
    ctx.globalAlpha = 1;
  }

  // ------------------------------------------------------------ usage

  function period() {
    var choice = $("usage-period").value;
    if (choice === "custom") {
      return { since: $("usage-since").value || todayUTC(), until: $("usage-until").value || todayUTC() };
    }
    return { since: choice, until: "today" };
  }

  function usageQuery(group, extra) {
    var p = period();
    var q = new URLSearchParams({ since: p.since, until: p.until, group: group });
    Object.keys(extra || {}).forEach(function (k) { q.set(k, extra[k]); });
    return "api/usage?" + q.toString();
  }

  function loadUsage() {
    var group = $("usage-group").value;
    Promise.all([api(usageQuery("key")), api(usageQuery("model")),
                 group === "key" ? null : api(usageQuery(group))])
      .then(function (answers) {
        var byKey = answers[0], byModel = answers[1], table = answers[2] || byKey;
        $("usage-range").textContent = byKey.since + " to " + byKey.until + " (UTC days)";
        drawBars($("bars-key"), byKey.data, "key_label");
        drawBars($("bars-model"), byModel.data, "model");
        showUsageTable(table);
        var l = byKey.ledger || {};
        $("ledger-state").textContent = "Ledger: " + (l.backend || "?") +
          (l.pending_rows ? ", " + l.pending_rows + " row(s) waiting to be written" : "") +
          (l.dropped ? ", " + l.dropped + " entr(ies) dropped" : "") +
          (l.write_failures ? ", " + l.write_failures + " failed write(s)" : "");
      }).catch(failed);
  }

  function label(row, dim) {
    var v = row[dim];
    if (v === "" || v === null || v === undefined) {
      return dim === "key_label" ? "(own / no key)" : "(unknown)";
    }
    return v;
  }

  function drawBars(box, rows, dim) {
    clear(box);
    if (!rows.length) { box.appendChild(el("p", { cls: "muted", text: "Nothing in this period." })); return; }
    rows = rows.slice().sort(function (a, b) {
      return (b.cost_usd - a.cost_usd) || (b.total_tokens - a.total_tokens);
    }).slice(0, 12);
    var maxSpend = Math.max.apply(null, rows.map(function (r) { return r.cost_usd; })) || 1;
    var maxTokens = Math.max.apply(null, rows.map(function (r) { return r.total_tokens; })) || 1;
    var rowH = 30, labelW = 150, width = 600, barW = width - labelW - 130;
    var chart = svg("svg", { viewBox: "0 0 " + width + " " + (rows.length * rowH + 4),
                             role: "img", "aria-label": "spend and tokens by " + dim });
    rows.forEach(function (row, i) {
      var y = i * rowH + 2;
      var name = String(label(row, dim));
      chart.appendChild(svg("text", { x: 0, y: y + 17 }, name.length > 22 ? name.slice(0, 21) + "…" : name));
      chart.appendChild(svg("rect", { x: labelW, y: y + 2, height: 11, rx: 2,
        "class": "bar-spend", width: Math.max(1, row.cost_usd / maxSpend * barW) }));
      chart.appendChild(svg("rect", { x: labelW, y: y + 15, height: 9, rx: 2,
        "class": "bar-tokens", width: Math.max(1, row.total_tokens / maxTokens * barW) }));
      chart.appendChild(svg("text", { x: labelW + barW + 8, y: y + 12 }, usd(row.cost_usd)));
      chart.appendChild(svg("text", { x: labelW + barW + 8, y: y + 25, "class": "dim" },
        int(row.total_tokens) + " tok"));
    });
    box.appendChild(chart);
    box.appendChild(el("div", { cls: "legend" }, [
      el("span", { cls: "swatch spend" }), "spend (USD)",
      el("span", { cls: "swatch tokens" }), "tokens"]));
  }

  var DIMS = { key: ["key_label"], model: ["model"], day: ["day"], route: ["route"],
               detail: ["day", "key_label", "model", "route"] };
  var DIM_NAMES = { key_label: "key", model: "model", day: "day", route: "route" };
  var COLUMNS = [
    ["requests", "requests", int], ["errors", "errors", int],
    ["prompt_tokens", "prompt", int], ["completion_tokens", "completion", int],
    ["cached_tokens", "cached", int], ["total_tokens", "tokens", int],
    ["cost_usd", "spend", usd],
    ["ttfb_mean", "first byte", function (v) { return v === null || v === undefined ? "–" : (v * 1000).toFixed(0) + " ms"; }]
  ];

  function showUsageTable(answer) {
    var table = $("usage-table");
    var dims = DIMS[answer.group] || [];
    var head = table.tHead, body = table.tBodies[0], foot = table.tFoot;
    clear(head); clear(body); clear(foot);
    head.appendChild(el("tr", null, dims.map(function (d) { return el("th", { text: DIM_NAMES[d] }); })
      .concat(COLUMNS.map(function (c) { return el("th", { cls: "num", text: c[1] }); }))));
    answer.data.forEach(function (row) {
      var tr = el("tr", { "data-name": dims.map(function (d) { return label(row, d); }).join(" / ") },
        dims.map(function (d) { return el("td", { text: String(label(row, d)) }); })
          .concat(COLUMNS.map(function (c) { return el("td", { cls: "num " + c[0], text: c[2](row[c[0]]) }); })));
      body.appendChild(tr);
    });
    if (!answer.data.length) {
      body.appendChild(el("tr", null, [el("td", { cls: "muted", colspan: String(dims.length + COLUMNS.length),
        text: "No usage in this period." })]));
    }
    var total = answer.total || {};
    foot.appendChild(el("tr", null, dims.map(function (d, i) { return el("td", { text: i ? "" : "total" }); })
      .concat(COLUMNS.map(function (c) { return el("td", { cls: "num", text: c[2](total[c[0]]) }); }))));
  }

  function downloadCSV() {
    api(usageQuery($("usage-group").value, { format: "csv" }), { raw: true }).then(function (response) {
      return response.blob();
    }).then(function (blob) {
      var link = el("a", { href: URL.createObjectURL(blob), download: "usage.csv" });
      document.body.appendChild(link);
      link.click();
      setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
    }).catch(failed);
  }

  // ------------------------------------------------------------ keys

  function describe(obj) {
    if (obj === null || obj === undefined) { return "–"; }
    if (typeof obj !== "object") { return String(obj); }
    var parts = Object.keys(obj).filter(function (k) { return obj[k] !== null && obj[k] !== undefined; })
      .map(function (k) {
        var v = obj[k];
        if (Array.isArray(v)) { v = v.join(", "); }
        else if (typeof v === "object") { v = describe(v); }
        else if (typeof v === "number" && /usd/i.test(k)) { v = usd(v); }
        else if (typeof v === "number") { v = int(v); }
        return k.replace(/_/g, " ") + ": " + v;
      });
    return parts.length ? parts.join(" · ") : "none";
  }

  function remaining(left) {
    if (!left) { return "–"; }
    if (left.error) { return left.error; }
    var names = Object.keys(left);
    if (!names.length) { return "–"; }
    return names.map(function (name) {
      var r = left[name];
      var fmt = /^usd/.test(name) ? usd : int;
      var text = name.replace(/_/g, " ") + " " + fmt(r.remaining) + " of " + fmt(r.limit);
      if (r.reset_seconds) { text += " (resets in " + Math.ceil(r.reset_seconds) + " s)"; }
      return text;
    }).join(" · ");
  }

  function showKeys(keys) {
    var body = $("default-keys-table").tBodies[0];
    clear(body);
    keys.default_keys.forEach(function (k) {
      var text = k.state === "resting" ? "resting until " + shortTime(k.until) + " UTC" : k.state;
      body.appendChild(el("tr", { "data-key": k.label }, [
        el("td", { text: k.label }),
        el("td", null, [el("span", { cls: "state " + k.state, text: text })])]));
    });
    if (!keys.default_keys.length) {
      body.appendChild(el("tr", null, [el("td", { colspan: "2", cls: "muted", text: "No default keys." })]));
    }
    var fbody = $("forward-keys-table").tBodies[0];
    clear(fbody);
    keys.forward_keys.forEach(function (k) {
      fbody.appendChild(el("tr", { "data-key": k.label }, [
        el("td", { text: k.label }),
        el("td", { cls: "wrap", text: k.policy ? describe(k.policy) : "no limits" }),
        el("td", { cls: "wrap remaining", text: remaining(k.remaining) })]));
    });
    if (!keys.forward_keys.length) {
      fbody.appendChild(el("tr", null, [el("td", { colspan: "3", cls: "muted", text: "No forward keys." })]));
    }
  }

  function fillKeyChoices(keys) {
    var select = $("exchanges-key");
    keys.forward_keys.forEach(function (k) {
      select.appendChild(el("option", { value: k.label, text: k.label }));
    });
    ["client", "default", "none"].forEach(function (name) {
      select.appendChild(el("option", { value: name, text: name }));
    });
  }

  // ------------------------------------------------------------ exchanges

  function text(content) {
    if (content === null || content === undefined) { return ""; }
    if (typeof content === "string") { return content; }
    if (Array.isArray(content)) {
      return content.map(function (part) {
        if (typeof part === "string") { return part; }
        if (part && typeof part.text === "string") { return part.text; }
        if (part && part.type) { return "[" + part.type + "]"; }
        return "";
      }).join("\n");
    }
    return JSON.stringify(content);
  }

  function question(record) {
    var messages = record.messages || [];
    for (var i = messages.length - 1; i >= 0; i--) {
      if (messages[i] && messages[i].role === "user") { return text(messages[i].content); }
    }
    if (typeof record.prompt === "string") { return record.prompt; }
    return record.path || "";
  }

  function tokens(record) {
    var u = record.usage;
    if (!u) { return "–"; }
    return int(u.total_tokens || ((u.prompt_tokens || 0) + (u.completion_tokens || 0)));
  }

  function loadExchanges(event) {
    if (event) { event.preventDefault(); }
    var q = new URLSearchParams({ limit: "50" });
    var words = $("exchanges-q").value.trim();
    if (words) { q.set("q", words); }
    if ($("exchanges-key").value) { q.set("key", $("exchanges-key").value); }
    api("api/exchanges?" + q.toString()).then(showExchanges).catch(failed);
  }

  function showExchanges(answer) {
    state.exchanges = answer.data;
    var body = $("exchanges-table").tBodies[0];
    clear(body);
    $("exchanges-state").textContent = !answer.recording ? "Chat records are off (LOG_CHAT=false)." :
      answer.data.length + " shown" + (answer.truncated ? " (search stopped early: older records not searched)" : "");
    answer.data.forEach(function (record) {
      var tr = el("tr", { cls: "exchange" + (record.request_id === state.openId ? " selected" : ""),
                          "data-id": record.request_id || "" }, [
        el("td", { text: shortTime(record.time) }),
        el("td", { text: record.key_label || "–" }),
        el("td", { text: record.model || "–" }),
        el("td", { text: String(record.status === undefined ? "–" : record.status) }),
        el("td", { cls: "num", text: tokens(record) }),
        el("td", { cls: "preview", text: question(record).slice(0, 120) })]);
      tr.addEventListener("click", function () { openConversation(record); });
      body.appendChild(tr);
    });
    if (!answer.data.length && answer.recording) {
      body.appendChild(el("tr", null, [el("td", { colspan: "6", cls: "muted", text: "No exchange found." })]));
    }
  }

  function message(role, content, extra) {
    var box = el("div", { cls: "message " + (role || "other") }, [
      el("div", { cls: "role", text: role || "?" }),
      el("div", { cls: "text", text: content })]);
    (extra || []).forEach(function (node) { box.appendChild(node); });
    return box;
  }

  function toolCalls(calls) {
    return (calls || []).map(function (call) {
      var fn = call["function"] || call;
      return el("pre", { text: "→ " + (fn.name || call.type || "call") + "(" +
        (typeof fn.arguments === "string" ? fn.arguments : JSON.stringify(fn.arguments || {})) + ")" });
    });
  }

  function openConversation(record) {
    state.openId = record.request_id;
    $("conversation").hidden = false;
    document.querySelector("#exchanges .split").classList.add("open");
    Array.prototype.forEach.call(document.querySelectorAll("#exchanges-table tbody tr"), function (tr) {
      tr.classList.toggle("selected", tr.getAttribute("data-id") === record.request_id);
    });
    $("conversation-title").textContent = (record.model || "exchange") + " · " + shortTime(record.time);
    var meta = $("conversation-meta");
    clear(meta);
    var u = record.usage || {};
    [["request", record.request_id], ["key", record.key_label], ["route", record.route],
     ["path", record.path], ["client", record.client], ["status", record.status],
     ["outcome", record.outcome], ["stream", record.stream ? "yes" : "no"],
     ["duration", record.duration === undefined ? null : record.duration + " s"],
     ["tokens", record.usage ? int(u.prompt_tokens) + " in, " + int(u.completion_tokens) + " out" : null],
     ["client left early", record.client_left ? "yes" : null],
     ["problems", (record.problems || []).join("; ") || null]]
      .forEach(function (pair) {
        if (pair[1] === null || pair[1] === undefined || pair[1] === "") { return; }
        meta.appendChild(el("dt", { text: pair[0] }));
        meta.appendChild(el("dd", { text: String(pair[1]) }));
      });
    var box = $("conversation-messages");
    clear(box);
    (record.messages || []).forEach(function (m) {
      box.appendChild(message(m.role, text(m.content), toolCalls(m.tool_calls)));
    });
    if (typeof record.prompt === "string") { box.appendChild(message("prompt", record.prompt)); }
    (record.choices || []).forEach(function (c) {
      var body = text(c.content !== undefined ? c.content : c.text);
      var extra = toolCalls(c.tool_calls);
      if (c.finish_reason) { extra.push(el("div", { cls: "role", text: "finish: " + c.finish_reason })); }
      box.appendChild(message(c.role || "assistant", body, extra));
    });
    if (record.error) { box.appendChild(message("error", text(record.error.message || record.error))); }
    if (record.excerpt) { box.appendChild(message("answer excerpt", record.excerpt)); }
  }

  function closeConversation() {
    state.openId = null;
    $("conversation").hidden = true;
    document.querySelector("#exchanges .split").classList.remove("open");
    Array.prototype.forEach.call(document.querySelectorAll("#exchanges-table tbody tr.selected"),
      function (tr) { tr.classList.remove("selected"); });
  }

  // ------------------------------------------------------------ wiring

  function init() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", function () { logout(""); });
    $("usage-form").addEventListener("submit", function (e) { e.preventDefault(); loadUsage(); });
    $("usage-period").addEventListener("change", function () {
      $("usage-form").classList.toggle("custom-on", $("usage-period").value === "custom");
      if ($("usage-period").value !== "custom") { loadUsage(); }
    });
    $("usage-group").addEventListener("change", loadUsage);
    $("usage-csv").addEventListener("click", downloadCSV);
    $("exchanges-form").addEventListener("submit", loadExchanges);
    $("exchanges-key").addEventListener("change", loadExchanges);
    $("conversation-close").addEventListener("click", closeConversation);
    window.addEventListener("resize", drawLive);
    var saved = sessionStorage.getItem(STORE);
    if (saved) {
      state.key = saved;
      api("api/keys").then(start).catch(function () { logout(""); });
    } else {
      showLogin("");
    }
  }

  document.addEventListener("DOMContentLoaded", init);
}());
