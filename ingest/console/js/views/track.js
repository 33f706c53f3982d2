// Track playback: a vehicle's stored positions for a period, its trips and stops, the alerts
// raised along it, and a cursor that replays the drive.

import { api } from "../api.js";
import { t } from "../i18n.js";
import { createMap, fenceLayer } from "../mapbase.js";
import { chinaMidnight, chinaTime, fmtNumber, fromLocalInput, h, hashParams, toLocalInput } from "../util.js";

const L = window.L;
const TRIP_COLOURS = ["#2563eb", "#7c3aed", "#0891b2", "#ca8a04", "#db2777"];
const SPEEDS = [1, 10, 60, 300]; // device seconds per real second

export function mount(el, ctx) {
  const params = hashParams();
  // The inputs hold minutes: the default end is the next minute, so "now" includes the
  // positions of the current one.
  const vehicle = h("input", { list: "track-plates", placeholder: t("track.vehicle"), required: true });
  const plates = h("datalist#track-plates");
  const from = h("input", { type: "datetime-local", value: params.from ? toLocalInput(params.from) : toLocalInput(chinaMidnight()) });
  const to = h("input", { type: "datetime-local", value: params.to ? toLocalInput(params.to) : toLocalInput(Date.now() + 60000) });
  const load = h("button.primary", { type: "submit" }, t("track.load"));
  const message = h("span.hint");
  const mapEl = h("div.map");
  const side = h("aside.side", h("p.hint", t("track.pick")));
  const form = h("form.toolbar", vehicle, plates, h("label", t("track.from"), from), h("label", t("track.to"), to), load, message);
  el.append(form, h("div.split", mapEl, side));

  const map = createMap(mapEl, ctx.config);
  api("/fences").then((fc) => fenceLayer(fc).addTo(map)).catch(() => {});
  const overlay = L.featureGroup().addTo(map);
  let vehicles = [];
  let player = null;

  api("/vehicles")
    .then((list) => {
      vehicles = list;
      for (const v of list) plates.append(h("option", { value: v.plate }, v.unit || ""));
      const wanted = params.vehicle && list.find((v) => String(v.id) === params.vehicle);
      if (wanted) {
        vehicle.value = wanted.plate;
        show();
      }
    })
    .catch((error) => (message.textContent = t("common.error", { error: error.message })));

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    show();
  });

  async function show() {
    const v = vehicles.find((x) => x.plate === vehicle.value.trim());
    if (!v) {
      message.textContent = t("track.unknown");
      return;
    }
    message.textContent = t("common.loading");
    if (player) player.stop();
    overlay.clearLayers();
    let data;
    try {
      data = await api(`/vehicles/${v.id}/track`, { params: { from: fromLocalInput(from.value), to: fromLocalInput(to.value) } });
    } catch (error) {
      message.textContent = t("common.error", { error: error.message });
      return;
    }
    const positions = data.positions || [];
    message.textContent = t("track.count", { n: positions.length }) + (data.thinned ? ` · ${t("track.thinned")}` : "");
    if (!positions.length) {
      side.replaceChildren(h("p.hint", t("track.empty")));
      return;
    }
    const times = positions.map((p) => Date.parse(p.device_time));
    const trips = data.trips || [];
    // The whole track thin and grey, each trip over it in its colour.
    L.polyline(positions.map((p) => [p.lat, p.lon]), { color: "#6b7280", weight: 2, opacity: 0.6 }).addTo(overlay);
    trips.forEach((trip, i) => {
      const a = Date.parse(trip.started_at);
      const b = trip.ended_at ? Date.parse(trip.ended_at) : Infinity;
      const part = positions.filter((p, k) => times[k] >= a && times[k] <= b).map((p) => [p.lat, p.lon]);
      if (part.length > 1) {
        L.polyline(part, { color: TRIP_COLOURS[i % TRIP_COLOURS.length], weight: 4 })
          .bindTooltip(t("track.trip_n", { n: i + 1 }))
          .addTo(overlay);
      }
    });
    // Stops: where a trip ended, until the next began.
    trips.forEach((trip, i) => {
      if (!trip.ended_at) return;
      const at = nearest(times, Date.parse(trip.ended_at));
      const next = trips[i + 1];
      const until = next ? chinaTime(next.started_at) : "";
      L.circleMarker([positions[at].lat, positions[at].lon], { radius: 7, color: "#1f2937", fillColor: "#fbbf24", fillOpacity: 1 })
        .bindTooltip(`${t("track.stop")} ${chinaTime(trip.ended_at)}${until ? ` – ${until}` : ""}`)
        .addTo(overlay);
    });
    const alerts = data.alerts || [];
    for (const alert of alerts) {
      const d = alert.detail || {};
      let ll = d.lat !== undefined && d.lon !== undefined ? [d.lat, d.lon] : null;
      if (!ll) {
        const k = nearest(times, Date.parse(alert.opened_at));
        ll = [positions[k].lat, positions[k].lon];
      }
      L.circleMarker(ll, { radius: 8, color: "#7f1d1d", fillColor: "#dc2626", fillOpacity: 0.9 })
        .bindTooltip(`${t(`rule.${alert.rule}`)} · ${chinaTime(alert.opened_at)}`)
        .on("click", () => (location.hash = `#/alerts/${encodeURIComponent(alert.id)}`))
        .addTo(overlay);
    }
    map.fitBounds(overlay.getBounds().pad(0.1), { animate: false });
    player = playback(positions, times);
    side.replaceChildren(
      h("h2", v.plate, " ", h("small", v.unit || "")),
      player.controls,
      h("h3", t("track.trips")),
      trips.length
        ? h(
            "table.grid",
            h("thead", h("tr", h("th", "#"), h("th", t("track.started")), h("th", t("track.ended")), h("th", "km"), h("th", t("track.filing")))),
            h(
              "tbody",
              trips.map((trip, i) =>
                h(
                  "tr",
                  h("td", h("span.swatch", { style: `background:${TRIP_COLOURS[i % TRIP_COLOURS.length]}` }), String(i + 1)),
                  h("td", chinaTime(trip.started_at)),
                  h("td", trip.ended_at ? chinaTime(trip.ended_at) : t("track.ongoing")),
                  h("td", fmtNumber(trip.distance_km)),
                  h("td", trip.filing_id ? h("a", { href: `#/filings/${trip.filing_id}` }, `#${trip.filing_id}`) : h("span.unfiled", t("track.unfiled"))),
                ),
              ),
            ),
          )
        : h("p.hint", t("track.no_trips")),
      h("h3", t("track.alerts")),
      alerts.length
        ? h(
            "ul.plain",
            alerts.map((a) =>
              h("li", h("a", { href: `#/alerts/${encodeURIComponent(a.id)}` }, `${chinaTime(a.opened_at)} ${t(`rule.${a.rule}`)}`), " ", h("span.state-pill", { dataset: { state: a.state } }, t(`astate.${a.state}`))),
            ),
          )
        : h("p.hint", t("track.no_alerts")),
    );
  }

  function playback(positions, times) {
    const marker = L.circleMarker([positions[0].lat, positions[0].lon], { radius: 8, color: "#111827", fillColor: "#f59e0b", fillOpacity: 1 }).addTo(overlay);
    const slider = h("input.slider", { type: "range", min: 0, max: positions.length - 1, value: 0 });
    const label = h("div.play-label");
    const speed = h("select", SPEEDS.map((s) => h("option", { value: s }, `×${s}`)));
    speed.value = "60";
    const button = h("button", { type: "button" }, t("track.play"));
    let timer = null;
    let clock = times[0];
    function showAt(k) {
      const p = positions[k];
      marker.setLatLng([p.lat, p.lon]);
      slider.value = k;
      label.textContent = `${chinaTime(p.device_time)} · ${fmtNumber(p.speed_kmh)} km/h`;
    }
    function stop() {
      clearInterval(timer);
      timer = null;
      button.textContent = t("track.play");
    }
    button.addEventListener("click", () => {
      if (timer) return stop();
      button.textContent = t("track.pause");
      let k = Number(slider.value);
      if (k >= positions.length - 1) k = 0;
      clock = times[k];
      const stepMs = 100;
      timer = setInterval(() => {
        clock += stepMs * Number(speed.value);
        while (k < positions.length - 1 && times[k + 1] <= clock) k++;
        showAt(k);
        if (k >= positions.length - 1) stop();
      }, stepMs);
    });
    slider.addEventListener("input", () => showAt(Number(slider.value)));
    showAt(0);
    return { controls: h("div.player", button, speed, slider, label), stop };
  }

  return () => {
    if (player) player.stop();
    map.remove();
  };
}

/** The index of the time in the sorted `times` closest to `at`. */
function nearest(times, at) {
  let lo = 0;
  let hi = times.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (times[mid] < at) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && Math.abs(times[lo - 1] - at) < Math.abs(times[lo] - at)) lo--;
  return lo;
}
