// Terminals and vehicles: online or not, last heard, binding history; admins edit a vehicle
// (an exempt flag change needs a reason, kept in the audit trail).

import { api, ApiError } from "../api.js";
import { t } from "../i18n.js";
import { chinaTime, h } from "../util.js";

const CATEGORIES = ["retained", "platform", "rental"];

export function mount(el, ctx, path) {
  const search = h("input.search", { type: "search", placeholder: t("fleet.search") });
  const show = h(
    "select",
    { "aria-label": t("fleet.show") },
    ["all", "online", "offline"].map((v) => h("option", { value: v }, t(`fleet.show_${v}`))),
  );
  const body = h("tbody");
  const note = h("p.hint");
  const side = h("aside.side", h("p.hint", t("fleet.pick")));
  el.append(
    h("div.toolbar", search, show, h("span.spacer"), note),
    h(
      "div.split",
      h(
        "div.scroll",
        h(
          "table.grid.fleet-table",
          h("thead", h("tr", ["plate", "unit", "category", "terminal", "online", "last_heard", "exempt"].map((c) => h("th", t(`fleet.col_${c}`))))),
          body,
        ),
      ),
      side,
    ),
  );
  let rows = [];

  async function reload() {
    note.textContent = t("common.loading");
    try {
      const [vehicles, latest, terminals] = await Promise.all([api("/vehicles"), api("/positions/latest").catch(() => []), api("/terminals").catch(() => [])]);
      const byVehicle = new Map(latest.map((p) => [p.vehicle_id, p]));
      const online = new Map(terminals.map((s) => [String(s.phone).replace(/^0+/, ""), s]));
      const limit = (ctx.config.offline_after_s || 600) * 1000;
      rows = vehicles.map((v) => {
        const p = byVehicle.get(v.id);
        const session = v.phone ? online.get(String(v.phone).replace(/^0+/, "")) : undefined;
        const heard = session ? session.last_seen : p ? p.received_at : null;
        const isOnline = !!session || (p && p.state !== "offline" && Date.now() - Date.parse(p.received_at) < limit);
        return { v, p, session, heard, online: !!isOnline };
      });
      draw();
    } catch (error) {
      note.textContent = t("common.error", { error: error.message });
    }
  }

  function draw() {
    const q = search.value.trim().toLowerCase();
    const which = show.value;
    const shown = rows.filter(
      (r) =>
        (which === "all" || (which === "online") === r.online) &&
        (!q || [r.v.plate, r.v.unit, r.v.phone].some((x) => (x || "").toLowerCase().includes(q))),
    );
    body.replaceChildren(
      ...shown.map((r) =>
        h(
          "tr.clickable",
          { dataset: { vehicle: r.v.id }, on: { click: () => (location.hash = `#/fleet/${r.v.id}`) } },
          h("td", r.v.plate),
          h("td", r.v.unit || ""),
          h("td", r.v.category ? t(`category.${r.v.category}`) : ""),
          h("td", r.v.phone || "—"),
          h("td", h("span.state-pill", { dataset: { state: r.online ? "moving" : "offline" } }, t(r.online ? "fleet.online" : "fleet.offline"))),
          h("td", chinaTime(r.heard)),
          h("td", r.v.exempt ? t("fleet.exempt") : ""),
        ),
      ),
    );
    const online = rows.filter((r) => r.online).length;
    note.textContent = t("fleet.count", { n: rows.length, online });
    if (path[0] && !side.dataset.shown) {
      const r = rows.find((x) => String(x.v.id) === path[0]);
      if (r) detail(r);
    }
  }

  async function detail(r) {
    side.dataset.shown = "1";
    const bindings = h("tbody", h("tr", h("td", { colspan: 3 }, t("common.loading"))));
    side.replaceChildren(
      h("h2", r.v.plate, " ", h("small", r.v.unit || "")),
      h(
        "dl.facts",
        h("dt", t("fleet.col_category")), h("dd", r.v.category ? t(`category.${r.v.category}`) : ""),
        h("dt", t("fleet.col_terminal")), h("dd", r.v.phone || "—"),
        h("dt", t("fleet.col_online")), h("dd", t(r.online ? "fleet.online" : "fleet.offline")),
        h("dt", t("fleet.col_last_heard")), h("dd", chinaTime(r.heard)),
        r.session ? [h("dt", t("fleet.connected_since")), h("dd", chinaTime(r.session.connected_since))] : null,
        r.session && r.session.edition ? [h("dt", t("fleet.edition")), h("dd", `JT/T 808-${r.session.edition}`)] : null,
        r.session && r.session.firmware ? [h("dt", t("fleet.firmware")), h("dd", r.session.firmware)] : null,
        h("dt", t("fleet.max_speed")), h("dd", r.v.max_speed_kmh ? `${r.v.max_speed_kmh} km/h` : "—"),
        h("dt", t("fleet.col_exempt")), h("dd", r.v.exempt ? t("fleet.exempt") : t("fleet.not_exempt")),
      ),
      h("p", h("a.button", { href: `#/track?vehicle=${r.v.id}` }, t("live.track"))),
      h("h3", t("fleet.bindings")),
      h("table.grid.bindings", h("thead", h("tr", h("th", t("fleet.col_terminal")), h("th", t("fleet.from")), h("th", t("fleet.to")))), bindings),
      ctx.can("editVehicle") ? vehicleForm(r.v, reload) : null,
    );
    try {
      const list = await api(`/vehicles/${r.v.id}/bindings`);
      bindings.replaceChildren(
        ...(list.length
          ? list.map((b) => h("tr", h("td", b.phone), h("td", chinaTime(b.from)), h("td", b.to ? chinaTime(b.to) : t("fleet.current"))))
          : [h("tr", h("td", { colspan: 3 }, t("fleet.no_bindings")))]),
      );
    } catch (error) {
      bindings.replaceChildren(h("tr", h("td", { colspan: 3 }, t("common.error", { error: error.message }))));
    }
  }

  search.addEventListener("input", draw);
  show.addEventListener("change", draw);
  reload();
  return () => {};
}

function vehicleForm(v, reload) {
  const phone = h("input", { name: "phone", value: v.phone || "" });
  const unit = h("input", { name: "unit", value: v.unit || "", required: true });
  const category = h("select", { name: "category" }, CATEGORIES.map((c) => h("option", { value: c }, t(`category.${c}`))));
  category.value = v.category || "retained";
  const maxSpeed = h("input", { name: "max_speed_kmh", type: "number", min: 1, step: 1, value: v.max_speed_kmh ?? "" });
  const exempt = h("input", { name: "exempt", type: "checkbox", checked: !!v.exempt });
  const reason = h("textarea", { name: "reason", rows: 2, maxlength: 500 });
  const reasonLabel = h("label.reason", { hidden: true }, h("span", t("fleet.reason")), reason);
  const message = h("p");
  exempt.addEventListener("change", () => {
    reasonLabel.hidden = exempt.checked === !!v.exempt;
    reason.required = !reasonLabel.hidden;
  });
  const form = h(
    "form.card.vehicle-form",
    h("h3", t("fleet.edit")),
    h("label", h("span", t("fleet.col_terminal")), phone),
    h("label", h("span", t("fleet.col_unit")), unit),
    h("label", h("span", t("fleet.col_category")), category),
    h("label", h("span", t("fleet.max_speed")), maxSpeed),
    h("label.inline", exempt, t("fleet.col_exempt")),
    reasonLabel,
    h("button.primary", { type: "submit" }, t("fleet.save")),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.className = "";
    const item = {
      plate: v.plate,
      phone: phone.value.trim() || null,
      unit: unit.value.trim(),
      category: category.value,
      exempt: exempt.checked,
      max_speed_kmh: maxSpeed.value ? Number(maxSpeed.value) : null,
    };
    if (exempt.checked !== !!v.exempt) {
      if (!reason.value.trim()) {
        message.className = "error";
        message.textContent = t("fleet.reason_needed");
        return;
      }
      item.reason = reason.value.trim();
    }
    try {
      await api("/vehicles", { method: "POST", body: [item] });
      message.className = "ok";
      message.textContent = t("fleet.saved");
      Object.assign(v, item);
      reload();
    } catch (error) {
      message.className = "error";
      message.textContent = (error instanceof ApiError ? error.problems : [error.message]).join("; ");
    }
  });
  return form;
}
