// Filings: list and search; a filing's versions; dispatchers file new trips and correct filings.

import { api } from "../api.js";
import { t } from "../i18n.js";
import { destinationNames, filingForm } from "../filingform.js";
import { chinaTime, h } from "../util.js";

// The list covers filings that ended in the last LIST_DAYS days or end later.
const LIST_DAYS = 90;

export function mount(el, ctx, path) {
  const search = h("input.search", { type: "search", placeholder: t("filings.search") });
  const newButton = ctx.can("file") ? h("button.primary.new-filing", { type: "button" }, t("filings.new")) : null;
  const body = h("tbody");
  const note = h("p.hint");
  const side = h("aside.side", h("p.hint", t("filings.pick")));
  el.append(
    h("div.toolbar", search, h("span.spacer"), newButton),
    h(
      "div.split",
      h(
        "div.scroll",
        h(
          "table.grid.filings-table",
          h("thead", h("tr", ["id", "plate", "start", "end", "destination", "purpose", "approver", "received_at", "version"].map((c) => h("th", t(`filing.${c}`))))),
          body,
        ),
        note,
      ),
      side,
    ),
  );
  let filings = [];
  let plates = [];
  let destinations = [];

  async function reload() {
    note.textContent = t("common.loading");
    try {
      const since = new Date(Date.now() - LIST_DAYS * 86400000).toISOString();
      [filings, destinations] = await Promise.all([api("/filings", { params: { since } }), destinationNames()]);
      filings.sort((a, b) => b.id - a.id);
      draw();
    } catch (error) {
      note.textContent = t("common.error", { error: error.message });
    }
    if (ctx.can("file")) {
      api("/vehicles")
        .then((vs) => (plates = vs.map((v) => v.plate)))
        .catch(() => {});
    }
  }

  function draw() {
    const q = search.value.trim().toLowerCase();
    const shown = filings.filter(
      (f) => !q || [f.plate, f.destination, f.purpose, f.approver, f.passengers, String(f.id)].some((v) => (v || "").toLowerCase().includes(q)),
    );
    body.replaceChildren(
      ...shown.map((f) =>
        h(
          "tr.clickable",
          { dataset: { filing: f.id }, on: { click: () => (location.hash = `#/filings/${f.id}`) } },
          h("td", String(f.id)),
          h("td", f.plate),
          h("td", chinaTime(f.start, { seconds: false })),
          h("td", chinaTime(f.end, { seconds: false })),
          h("td", f.destination || ""),
          h("td", f.purpose || ""),
          h("td", f.approver || ""),
          h("td", chinaTime(f.received_at)),
          h("td", String(f.version ?? "")),
        ),
      ),
    );
    note.textContent = t("filings.count", { n: shown.length, total: filings.length });
  }

  async function show(id) {
    side.replaceChildren(h("p.hint", t("common.loading")));
    let f;
    try {
      f = await api(`/filings/${id}`);
    } catch (error) {
      side.replaceChildren(h("p.error", t("common.error", { error: error.message })));
      return;
    }
    const versions = f.versions || [];
    const correct = ctx.can("file")
      ? h("button.correct-filing", { type: "button", on: { click: () => edit({ ...f, id: f.id }) } }, t("filings.correct"))
      : null;
    side.replaceChildren(
      h("h2", `#${f.id} · ${f.plate || ""}`),
      h(
        "dl.facts",
        h("dt", t("filing.start")), h("dd", chinaTime(f.start)),
        h("dt", t("filing.end")), h("dd", chinaTime(f.end)),
        h("dt", t("filing.destination")), h("dd", f.destination || ""),
        h("dt", t("filing.purpose")), h("dd", f.purpose || ""),
        h("dt", t("filing.passengers")), h("dd", f.passengers || ""),
        h("dt", t("filing.approver")), h("dd", f.approver || ""),
        h("dt", t("filing.received_at")), h("dd", chinaTime(f.received_at)),
        f.claimed_filed_at ? [h("dt", t("filing.claimed_filed_at")), h("dd", chinaTime(f.claimed_filed_at))] : null,
        h("dt", t("filing.state")), h("dd", f.state || ""),
      ),
      correct,
      h("h3", t("filings.versions")),
      h(
        "table.grid",
        h("thead", h("tr", ["version", "start", "end", "received_at"].map((c) => h("th", t(`filing.${c}`))))),
        h(
          "tbody",
          versions.map((v) =>
            h("tr", h("td", String(v.version)), h("td", chinaTime(v.start, { seconds: false })), h("td", chinaTime(v.end, { seconds: false })), h("td", chinaTime(v.received_at || v.filed_at))),
          ),
        ),
      ),
    );
  }

  function edit(initial) {
    const form = filingForm(
      initial,
      (id) => {
        reload();
        if (id) location.hash = `#/filings/${id}`;
        else side.replaceChildren(h("p.ok", t("filings.saved")));
      },
      { plates, destinations },
    );
    side.replaceChildren(form);
  }

  search.addEventListener("input", draw);
  if (newButton) newButton.addEventListener("click", () => edit({}));
  reload();
  if (path[0]) show(path[0]);
  return () => {};
}
