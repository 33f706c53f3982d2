// Alerts: the live feed with filters, and an alert's detail (map, the filing it concerns, its
// history and notes; acknowledge and comment; back-file the trip from a pending alert).

import { api, ApiError } from "../api.js";
import { t } from "../i18n.js";
import { createMap } from "../mapbase.js";
import { destinationNames, filingForm } from "../filingform.js";
import { chinaTime, duration, h } from "../util.js";

const L = window.L;
export const RULES = [
  "unfiled_trip",
  "holiday_sealing",
  "out_of_area",
  "forbidden_zone",
  "overnight_parking",
  "overdue_return",
  "overspeed",
  "terminal_tamper",
  "terminal_offline",
];
export const ALERT_STATES = ["open", "pending_backfill", "resolved", "violation"];
const SEVERITIES = ["high", "medium", "low"];
const BACKFILL_RULES = new Set(["unfiled_trip", "holiday_sealing"]);
// The list shows the newest alerts of the last week at most: older ones are the report's job.
const LIST_DAYS = 7;
const LIST_LIMIT = 500;

export function mount(el, ctx, path) {
  if (path[0]) return detail(el, ctx, decodeURIComponent(path[0]));
  return list(el, ctx);
}

function select(name, values, label) {
  return h(
    "select",
    { name, "aria-label": t(`alerts.${name}`) },
    h("option", { value: "" }, t(`alerts.any_${name}`)),
    values.map((v) => h("option", { value: v }, label(v))),
  );
}

function list(el, ctx) {
  const unit = h("input", { name: "unit", placeholder: t("alerts.unit"), list: "alert-units" });
  const units = h("datalist#alert-units");
  const rule = select("rule", RULES, (r) => t(`rule.${r}`));
  const state = select("state", ALERT_STATES, (s) => t(`astate.${s}`));
  const severity = select("severity", SEVERITIES, (s) => t(`severity.${s}`));
  const live = h("span.stream-status");
  const body = h("tbody");
  const note = h("p.hint");
  el.append(
    h("form.toolbar.filters", unit, units, rule, state, severity, h("span.spacer"), live),
    h(
      "div.scroll",
      h(
        "table.grid.alerts-table",
        h(
          "thead",
          h(
            "tr",
            ["opened", "plate", "unit", "rule", "severity", "state", "deadline", "acknowledged"].map((c) => h("th", t(`alerts.col_${c}`))),
          ),
        ),
        body,
      ),
      note,
    ),
  );
  if (ctx.user.unit) {
    unit.value = ctx.user.unit;
    unit.readOnly = true;
  }
  api("/vehicles")
    .then((vs) => {
      for (const u of new Set(vs.map((v) => v.unit))) units.append(h("option", { value: u }));
    })
    .catch(() => {});

  const rows = new Map(); // alert id -> <tr>
  const filters = () => ({ unit: unit.value.trim(), rule: rule.value, state: state.value, severity: severity.value });
  const matches = (a, f) =>
    (!f.unit || a.unit === f.unit) && (!f.rule || a.rule === f.rule) && (!f.state || a.state === f.state) && (!f.severity || a.severity === f.severity);

  function row(a, fresh) {
    const tr = h(
      "tr.clickable",
      { dataset: { alert: a.id, state: a.state, rule: a.rule }, on: { click: () => (location.hash = `#/alerts/${encodeURIComponent(a.id)}`) } },
      h("td", chinaTime(a.opened_at)),
      h("td", a.plate || ""),
      h("td", a.unit || ""),
      h("td", t(`rule.${a.rule}`)),
      h("td", h("span.severity", { dataset: { severity: a.severity } }, t(`severity.${a.severity}`))),
      h("td", h("span.state-pill", { dataset: { state: a.state } }, t(`astate.${a.state}`))),
      h("td", a.state === "pending_backfill" && a.deadline ? chinaTime(a.deadline, { seconds: false }) : ""),
      h("td", a.acknowledged ? "✓" : ""),
    );
    if (fresh) tr.classList.add("fresh");
    return tr;
  }

  function upsert(a, fresh) {
    const old = rows.get(a.id);
    if (old && a.acknowledged === undefined) a.acknowledged = old.dataset.ack === "1";
    const tr = row(a, fresh);
    tr.dataset.ack = a.acknowledged ? "1" : "0";
    if (old) old.replaceWith(tr);
    else body.prepend(tr);
    rows.set(a.id, tr);
  }

  let generation = 0;
  async function reload() {
    const mine = ++generation;
    const f = filters();
    note.textContent = t("common.loading");
    try {
      const since = new Date(Date.now() - LIST_DAYS * 86400000).toISOString();
      const found = await api("/alerts", { params: { ...f, since, limit: LIST_LIMIT } });
      if (mine !== generation) return;
      body.replaceChildren();
      rows.clear();
      for (const a of found.slice().reverse()) upsert(a, false);
      note.textContent = found.length ? t("alerts.showing", { n: found.length, days: LIST_DAYS }) : t("alerts.none");
    } catch (error) {
      note.textContent = t("common.error", { error: error.message });
    }
  }

  for (const input of [unit, rule, state, severity]) input.addEventListener("change", reload);
  const off = ctx.alerts.subscribe((a, streamState) => {
    live.textContent = t(streamState === "live" ? "live.live" : "live.connecting");
    live.dataset.state = streamState;
    if (!a) return;
    if (matches(a, filters())) upsert(a, true);
    else if (rows.has(a.id)) {
      rows.get(a.id).remove();
      rows.delete(a.id);
    }
  });
  live.textContent = t(ctx.alerts.state === "live" ? "live.live" : "live.connecting");
  live.dataset.state = ctx.alerts.state;
  reload();
  return off;
}

function detail(el, ctx, id) {
  const root = h("div.alert-detail", h("p.hint", t("common.loading")));
  el.append(h("p", h("a", { href: "#/alerts" }, `← ${t("alerts.back")}`)), root);
  let map = null;
  let alive = true;
  let countdown = null;
  let filedId = null; // the filing made here: said on every later render too

  async function load() {
    let a;
    try {
      a = await api(`/alerts/${encodeURIComponent(id)}`);
    } catch (error) {
      root.replaceChildren(h("p.error", error instanceof ApiError && error.status === 404 ? t("alerts.not_found") : t("common.error", { error: error.message })));
      return;
    }
    if (!alive) return;
    render(a);
  }

  function render(a) {
    if (map) map.remove();
    clearInterval(countdown);
    const d = a.detail || {};
    const mapEl = h("div.map.small-map");
    const facts = h(
      "dl.facts",
      h("dt", t("alerts.col_rule")), h("dd", t(`rule.${a.rule}`)),
      h("dt", t("alerts.col_state")), h("dd", h("span.state-pill.alert-state", { dataset: { state: a.state } }, t(`astate.${a.state}`))),
      h("dt", t("alerts.col_severity")), h("dd", h("span.severity", { dataset: { severity: a.severity } }, t(`severity.${a.severity}`))),
      h("dt", t("alerts.col_plate")), h("dd", a.plate || ""),
      h("dt", t("alerts.col_unit")), h("dd", a.unit || ""),
      h("dt", t("vehicle.terminal")), h("dd", a.phone || ""),
      h("dt", t("alerts.col_opened")), h("dd", chinaTime(a.opened_at)),
      h("dt", t("alerts.updated")), h("dd", chinaTime(a.updated_at)),
      a.closed_at ? [h("dt", t("alerts.closed")), h("dd", chinaTime(a.closed_at))] : null,
      a.deadline ? [h("dt", t("alerts.col_deadline")), h("dd.deadline", chinaTime(a.deadline))] : null,
    );
    const remaining = h("p.deadline-left");
    if (a.state === "pending_backfill" && a.deadline) {
      const tick = () => {
        const left = (Date.parse(a.deadline) - Date.now()) / 1000;
        remaining.textContent = left > 0 ? t("alerts.deadline_left", { left: duration(left) }) : t("alerts.deadline_passed");
      };
      tick();
      countdown = setInterval(tick, 1000);
    }
    const extra = Object.entries(d).filter(([k]) => !["lat", "lon", "key"].includes(k));
    const detailList = extra.length
      ? h("dl.facts.detail", extra.map(([k, v]) => [h("dt", t(`detail.${k}`, {}, k)), h("dd", detailValue(v))]))
      : null;

    const filingBox = h("div.card.filing-box", h("h3", t("alerts.filing")));
    if (a.filing) {
      const f = a.filing;
      filingBox.append(
        h(
          "dl.facts",
          h("dt", "#"), h("dd", h("a", { href: `#/filings/${f.id}` }, String(f.id))),
          h("dt", t("filing.start")), h("dd", chinaTime(f.start)),
          h("dt", t("filing.end")), h("dd", chinaTime(f.end)),
          h("dt", t("filing.destination")), h("dd", f.destination || ""),
          h("dt", t("filing.purpose")), h("dd", f.purpose || ""),
          h("dt", t("filing.approver")), h("dd", f.approver || ""),
          h("dt", t("filing.received_at")), h("dd", chinaTime(f.received_at)),
        ),
      );
    } else {
      filingBox.append(h("p.hint", BACKFILL_RULES.has(a.rule) ? t("alerts.no_filing_yet") : t("alerts.no_filing")));
    }
    if (filedId !== null) filingBox.append(h("p.ok.filed-note", t(a.state === "resolved" ? "alerts.filed_resolved" : "alerts.filed", { id: filedId })));
    const canBackfill = filedId === null && BACKFILL_RULES.has(a.rule) && (a.state === "pending_backfill" || a.state === "violation");
    if (canBackfill && ctx.can("file")) {
      const button = h("button.primary.file-from-alert", { type: "button" }, t("alerts.file_trip"));
      button.addEventListener("click", async () => {
        button.disabled = true;
        const initial = await tripWindow(a);
        const form = filingForm(
          initial,
          (filingId) => {
            filedId = filingId;
            form.replaceWith(h("p.ok.filed-note", t("alerts.filed", { id: filingId })));
          },
          { plates: [a.plate], destinations: await destinationNames() },
        );
        button.replaceWith(form);
      });
      filingBox.append(button);
    }

    const notes = h(
      "ul.notes",
      (a.notes || []).map((n) => h("li", h("b", n.user), " ", h("span.hint", chinaTime(n.at)), n.acknowledged ? h("span.ack", ` ✓ ${t("alerts.acknowledged")}`) : null, h("p", n.text))),
    );
    const notesBox = h("div.card", h("h3", t("alerts.notes")), (a.notes || []).length ? notes : h("p.hint", t("alerts.no_notes")));
    if (ctx.can("note")) notesBox.append(noteForm(a, load));

    const events = h(
      "ol.events",
      (a.events || []).map((e) => {
        const s = (e.alert || {}).state;
        return h("li", h("span.hint", chinaTime(e.at)), " ", s ? h("span.state-pill", { dataset: { state: s } }, t(`astate.${s}`)) : "");
      }),
    );

    root.replaceChildren(
      h("h2", `${t(`rule.${a.rule}`)} · ${a.plate || ""}`),
      h("div.split", h("div.col", facts, remaining, detailList, mapEl), h("div.col", filingBox, notesBox, h("div.card", h("h3", t("alerts.history")), events))),
    );
    map = createMap(mapEl, ctx.config, { zoom: 13 });
    placeOnMap(a);
  }

  async function placeOnMap(a) {
    const here = map; // a live update may replace the map while the track loads
    const d = a.detail || {};
    const opened = Date.parse(a.opened_at);
    const group = L.featureGroup();
    if (a.vehicle !== null && a.vehicle !== undefined) {
      try {
        const track = await api(`/vehicles/${a.vehicle}/track`, {
          params: { from: new Date(opened - 30 * 60000).toISOString(), to: new Date(Math.min(Date.now(), opened + 2 * 3600000) + 1000).toISOString() },
        });
        const pts = (track.positions || []).map((p) => [p.lat, p.lon]);
        if (pts.length > 1) L.polyline(pts, { color: "#2563eb", weight: 3 }).addTo(group);
      } catch {
        // the marker below is the point of the map
      }
    }
    if (d.lat !== undefined && d.lon !== undefined) {
      L.circleMarker([d.lat, d.lon], { radius: 9, color: "#7f1d1d", fillColor: "#dc2626", fillOpacity: 0.9 }).addTo(group);
    }
    if (here !== map || !alive) return;
    group.addTo(here);
    if (group.getLayers().length) here.fitBounds(group.getBounds().pad(0.3), { maxZoom: 15, animate: false });
  }

  // The alert changes live (a filing resolves it): show the new state without a reload.
  const off = ctx.alerts.subscribe((a) => {
    if (a && a.id === id) load();
  });
  load();
  return () => {
    alive = false;
    off();
    clearInterval(countdown);
    if (map) map.remove();
  };
}

const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/;

function detailValue(v) {
  if (typeof v === "boolean") return t(v ? "common.yes" : "common.no");
  if (typeof v === "string" && ISO_TIME.test(v)) return chinaTime(v);
  return typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
}

function noteForm(a, reload) {
  const text = h("textarea", { name: "text", rows: 3, required: true, maxlength: 2000, placeholder: t("alerts.note_placeholder") });
  const ack = h("input", { type: "checkbox", name: "acknowledge", checked: !a.acknowledged });
  const error = h("p.error");
  const form = h(
    "form.note-form",
    text,
    h("label.inline", ack, t("alerts.acknowledge")),
    h("button", { type: "submit" }, t("alerts.add_note")),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      await api(`/alerts/${encodeURIComponent(a.id)}/notes`, { method: "POST", body: { text: text.value.trim(), acknowledge: ack.checked } });
      reload();
    } catch (e) {
      error.textContent = t("common.error", { error: e.message });
    }
  });
  return form;
}

/** The window of the trip the alert is about, for a back-filing: from the trips table when
 * the trip is found (it started at the alert's opening), else from the opening until now. */
async function tripWindow(a) {
  const opened = Date.parse(a.opened_at);
  let start = opened;
  let end = Math.max(Date.now(), opened + 3600000);
  if (a.vehicle !== null && a.vehicle !== undefined) {
    try {
      const track = await api(`/vehicles/${a.vehicle}/track`, {
        params: { from: new Date(opened - 3600000).toISOString(), to: new Date(Math.max(Date.now(), opened + 60000)).toISOString() },
      });
      const trip = (track.trips || []).find((x) => Math.abs(Date.parse(x.started_at) - opened) < 60000);
      if (trip) {
        start = Date.parse(trip.started_at);
        // A trip still going: filed until an hour from now, the dispatcher corrects it.
        end = trip.ended_at ? Date.parse(trip.ended_at) : Math.max(Date.now() + 3600000, start + 3600000);
      }
    } catch {
      // the fallback window covers the opening, which is what the rule asks
    }
  }
  // Minutes are what the form shows: round the start down and the end up, so the trip stays covered.
  start = Math.floor(start / 60000) * 60000;
  end = Math.ceil(end / 60000) * 60000;
  return { plate: a.plate, start: new Date(start).toISOString(), end: new Date(end).toISOString(), purpose: "", passengers: "", approver: "" };
}
