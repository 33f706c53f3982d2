// Live map: every vehicle at its latest position, coloured by state, updated from
// /positions/stream (a snapshot, then the changed vehicles at most once a second); fences;
// a click on a vehicle shows its details, current trip and filing.

import { api, eventStream } from "../api.js";
import { t } from "../i18n.js";
import { createMap, fenceLayer, STATES, STATE_COLOURS, VehicleLayer } from "../mapbase.js";
import { chinaTime, clear, fmtNumber, h } from "../util.js";

// Kept for the tests and the benchmark (bench/console_map.py): when each positions event
// arrived and when the map had drawn it.  Capped: a console stays open for days.
const MAX_SAMPLES = 2000;

export function mount(el, ctx) {
  const mapEl = h("div.map.live-map");
  const side = h("aside.side");
  const status = h("span.stream-status", t("live.connecting"));
  const counts = h("div.legend");
  const search = h("input.search", { type: "search", placeholder: t("live.search"), list: "plates-live" });
  const plates = h("datalist#plates-live");
  el.append(
    h("div.toolbar", search, plates, counts, h("span.spacer"), status),
    h("div.split", mapEl, side),
  );
  side.append(h("p.hint", t("live.pick")));

  const map = createMap(mapEl, ctx.config);
  const layer = new VehicleLayer({ onSelect: (record) => select(record) });
  layer.addTo(map);
  let fitted = false;
  let selectedId = null;
  let pending = []; // positions events received, not yet drawn
  const stats = { events: [], lastEventAt: 0, vehicles: 0 };
  ctx.liveStats = stats;
  ctx.liveMap = map;
  ctx.liveLayer = layer;
  layer.stats.onDraw = () => {
    if (!pending.length) return;
    const drawnAt = performance.now();
    const wall = Date.now();
    for (const p of pending) {
      stats.events.push({ arrived: p.arrived, drawn: drawnAt, wall, n: p.n, newest: p.newest });
    }
    if (stats.events.length > MAX_SAMPLES) stats.events.splice(0, stats.events.length - MAX_SAMPLES);
    pending = [];
  };

  api("/fences")
    .then((fc) => fenceLayer(fc, (p) => `${p.name || ""} (${t(`fence.${p.kind}`)})`).addTo(map))
    .catch((error) => console.warn("fences:", error));

  function legend() {
    const n = [0, 0, 0, 0];
    for (const r of layer.records()) n[STATES.indexOf(r.state)]++;
    clear(counts);
    STATES.forEach((state, i) => {
      const on = !layer.hidden.has(state);
      counts.append(
        h(
          "button.legend-item",
          {
            type: "button",
            dataset: { state },
            "aria-pressed": String(on),
            on: {
              click: () => {
                const hidden = new Set(layer.hidden);
                if (hidden.has(state)) hidden.delete(state);
                else hidden.add(state);
                layer.setHidden(hidden);
                legend();
              },
            },
          },
          h("span.swatch", { style: `background:${STATE_COLOURS[state]}` }),
          `${t(`state.${state}`)} `,
          h("b", { dataset: { count: state } }, String(n[i])),
        ),
      );
    });
    stats.vehicles = layer.records().length;
  }

  function platesList() {
    clear(plates);
    for (const r of layer.records()) plates.append(h("option", { value: r.plate || "" }));
  }

  function receive(records, replace) {
    const now = performance.now();
    let newest = 0;
    for (const r of records) {
      const at = Date.parse(r.received_at);
      if (at > newest) newest = at;
    }
    pending.push({ arrived: now, n: records.length, newest });
    stats.lastEventAt = Date.now();
    if (replace) layer.setAll(records);
    else layer.update(records);
    if (!fitted && layer.records().length) {
      const b = layer.bounds();
      if (b) map.fitBounds(b.pad(0.1), { maxZoom: 14, animate: false });
      fitted = true;
    }
    legendSoon();
    if (replace) platesList();
    if (selectedId !== null && records.some((r) => r.vehicle_id === selectedId)) details(layer.record(selectedId), false);
  }

  // The legend counts change every second; recounting 10,000 on each event is cheap, but
  // rebuilding DOM once a second is plenty.
  let legendTimer = null;
  function legendSoon() {
    if (legendTimer) return;
    legendTimer = setTimeout(() => {
      legendTimer = null;
      legend();
    }, 500);
  }

  // A vehicle the server has not heard from for offline_after_s shows as offline even when no
  // event says so (the stream sends changes; silence is not one).
  const ageTimer = setInterval(() => {
    const limit = (ctx.config.offline_after_s || 600) * 1000;
    const now = Date.now();
    const stale = layer.records().filter((r) => r.state !== "offline" && now - Date.parse(r.received_at) > limit);
    if (stale.length) layer.update(stale.map((r) => ({ ...r, state: "offline" })));
  }, 10000);

  const source = eventStream(
    "/positions/stream",
    {},
    {
      snapshot: (records) => receive(records, true),
      positions: (records) => receive(records, false),
    },
    (state) => {
      status.textContent = t(state === "live" ? "live.live" : "live.connecting");
      status.dataset.state = state;
    },
  );

  search.addEventListener("change", () => {
    const q = search.value.trim();
    const found = layer.records().find((r) => r.plate === q) || layer.records().find((r) => (r.plate || "").includes(q));
    if (found && found.lat !== null) {
      // Keep the operator's zoom unless it is too far out to tell the vehicle from others.
      map.setView([found.lat, found.lon], Math.max(map.getZoom(), 12), { animate: false });
      select(found);
    }
  });

  function select(record) {
    selectedId = record ? record.vehicle_id : null;
    layer.select(selectedId);
    if (!record) {
      side.replaceChildren(h("p.hint", t("live.pick")));
      return;
    }
    details(record, true);
  }

  let tripBox = h("div");
  function details(r, fresh) {
    if (fresh) tripBox = h("div.trip-box", h("p.hint", t("common.loading")));
    side.replaceChildren(
      h(
        "div.vehicle-card",
        { dataset: { vehicle: r.vehicle_id } },
        h("h2.plate", r.plate || "—"),
        h("span.state-pill", { dataset: { state: r.state } }, t(`state.${r.state}`)),
        h(
          "dl.facts",
          h("dt", t("vehicle.unit")), h("dd", r.unit || ""),
          h("dt", t("vehicle.category")), h("dd", r.category ? t(`category.${r.category}`) : ""),
          h("dt", t("vehicle.terminal")), h("dd", r.phone || ""),
          h("dt", t("vehicle.last_report")), h("dd", chinaTime(r.device_time)),
          h("dt", t("vehicle.received")), h("dd", chinaTime(r.received_at)),
          h("dt", t("vehicle.speed")), h("dd", `${fmtNumber(r.speed_kmh)} km/h`),
          h("dt", t("vehicle.direction")), h("dd", `${r.direction ?? ""}°`),
          h("dt", t("vehicle.position")), h("dd", `${fmtNumber(r.lat, 5)}, ${fmtNumber(r.lon, 5)}`),
        ),
        tripBox,
        h("p", h("a.button", { href: `#/track?vehicle=${encodeURIComponent(r.vehicle_id)}` }, t("live.track"))),
      ),
    );
    if (fresh) currentTrip(r, tripBox);
  }

  async function currentTrip(r, box) {
    const to = new Date();
    const from = new Date(to.getTime() - 24 * 3600 * 1000);
    try {
      const track = await api(`/vehicles/${encodeURIComponent(r.vehicle_id)}/track`, {
        params: { from: from.toISOString(), to: to.toISOString() },
      });
      const trips = track.trips || [];
      const trip = trips.find((x) => !x.ended_at) || null;
      const rows = [h("h3", t("live.current_trip"))];
      if (!trip) {
        const last = trips[trips.length - 1];
        rows.push(h("p", last ? t("live.last_trip_ended", { at: chinaTime(last.ended_at) }) : t("live.no_trip")));
      } else {
        const since = chinaTime(trip.started_at);
        rows.push(h("p", trip.distance_km === null || trip.distance_km === undefined ? t("live.trip_started", { at: since }) : t("live.trip_since", { at: since, km: fmtNumber(trip.distance_km) })));
        if (trip.filing_id) {
          rows.push(h("p.filed", h("a", { href: `#/filings/${trip.filing_id}` }, t("live.filed_as", { id: trip.filing_id }))));
          try {
            const f = await api(`/filings/${trip.filing_id}`);
            rows.push(h("p.hint", `${f.destination || ""} · ${f.purpose || ""} · ${chinaTime(f.start, { seconds: false })} – ${chinaTime(f.end, { seconds: false })}`));
          } catch {
            // the link is there; the summary is a convenience
          }
        } else {
          rows.push(h("p.unfiled", t("live.unfiled")));
        }
      }
      box.replaceChildren(...rows);
    } catch (error) {
      box.replaceChildren(h("p.error", t("common.error", { error: error.message })));
    }
  }

  return () => {
    source.close();
    clearInterval(ageTimer);
    clearTimeout(legendTimer);
    map.remove();
    if (ctx.liveStats === stats) {
      ctx.liveStats = null;
      ctx.liveMap = null;
      ctx.liveLayer = null;
    }
  };
}
