// Reports: violations per unit and rule for a month, drawn as an SVG bar chart (integer ticks),
// the back-filing counts, and the CSV the inspection departments take away.

import { api, apiUrl } from "../api.js";
import { t } from "../i18n.js";
import { chinaMonth, h } from "../util.js";
import { RULES } from "./alerts.js";

const SVG = "http://www.w3.org/2000/svg";
const RULE_COLOURS = ["#dc2626", "#ea580c", "#d97706", "#65a30d", "#0891b2", "#2563eb", "#7c3aed", "#db2777", "#6b7280"];

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : String(c));
  return el;
}

export function mount(el, ctx) {
  const period = h("input", { type: "month", name: "period", value: chinaMonth(), required: true });
  const unit = h("input", { name: "unit", placeholder: t("reports.all_units"), list: "report-units" });
  const units = h("datalist#report-units");
  const csv = h("a.button.csv-link", { download: "" }, t("reports.csv"));
  const chart = h("div.chart");
  const tables = h("div.report-tables");
  const note = h("p.hint");
  const form = h("form.toolbar", h("label", t("reports.period"), period), unit, units, h("button.primary", { type: "submit" }, t("reports.show")), h("span.spacer"), csv);
  el.append(form, h("div.report", h("h2", t("reports.title")), note, chart, tables));
  if (ctx.user.unit) {
    unit.value = ctx.user.unit;
    unit.readOnly = true;
  }
  api("/vehicles")
    .then((vs) => {
      for (const u of new Set(vs.map((v) => v.unit))) units.append(h("option", { value: u }));
    })
    .catch(() => {});

  async function load() {
    const params = { period: period.value, unit: unit.value.trim() };
    csv.href = apiUrl("/reports/violations", { ...params, format: "csv" });
    csv.setAttribute("download", `violations-${params.period}.csv`);
    note.textContent = t("common.loading");
    try {
      const report = await api("/reports/violations", { params });
      draw(report);
    } catch (error) {
      note.textContent = t("common.error", { error: error.message });
    }
  }

  function draw(report) {
    const violations = report.violations || [];
    const backfilling = report.backfilling || [];
    const total = violations.reduce((n, v) => n + Number(v.violations), 0);
    note.textContent = t("reports.summary", { period: report.period, n: total });
    chart.replaceChildren(total ? barChart(violations) : h("p.hint", t("reports.none")));
    tables.replaceChildren(
      h("h3", t("reports.violations")),
      h(
        "table.grid",
        h("thead", h("tr", h("th", t("reports.unit")), h("th", t("reports.rule")), h("th.num", t("reports.violations_n")), h("th.num", t("reports.vehicles_n")))),
        h("tbody", violations.map((v) => h("tr", h("td", v.unit), h("td", t(`rule.${v.rule}`)), h("td.num", String(v.violations)), h("td.num", String(v.vehicles ?? ""))))),
      ),
      h("h3", t("reports.backfilling")),
      backfilling.length
        ? h(
            "table.grid",
            h("thead", h("tr", h("th", t("reports.unit")), h("th.num", t("reports.in_time")), h("th.num", t("reports.late")), h("th.num", t("reports.claimed_earlier")))),
            h("tbody", backfilling.map((b) => h("tr", h("td", b.unit), h("td.num", String(b.in_time)), h("td.num", String(b.late)), h("td.num", String(b.claimed_earlier))))),
          )
        : h("p.hint", t("reports.no_backfilling")),
    );
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  load();
  return () => {};
}

/** Horizontal stacked bars: one per unit, a segment per rule; ticks at whole numbers. */
function barChart(violations) {
  const unitsList = [...new Set(violations.map((v) => v.unit))];
  const rules = RULES.filter((r) => violations.some((v) => v.rule === r));
  for (const v of violations) if (!rules.includes(v.rule)) rules.push(v.rule);
  const totals = unitsList.map((u) => violations.filter((v) => v.unit === u).reduce((n, v) => n + Number(v.violations), 0));
  const max = Math.max(1, ...totals);
  const step = niceStep(max);
  const top = Math.ceil(max / step) * step;
  const labelW = 180;
  const plotW = 560;
  const barH = 26;
  const gap = 10;
  const legendH = 24 * Math.ceil(rules.length / 3);
  const height = 30 + unitsList.length * (barH + gap) + 30 + legendH;
  const width = labelW + plotW + 40;
  const x = (n) => labelW + (n / top) * plotW;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "bar-chart", "aria-label": t("reports.title") });
  const axisY = 20 + unitsList.length * (barH + gap);
  for (let n = 0; n <= top; n += step) {
    svg.append(s("line", { x1: x(n), x2: x(n), y1: 14, y2: axisY, stroke: "#e5e7eb" }));
    svg.append(s("text", { x: x(n), y: axisY + 16, "text-anchor": "middle", class: "tick" }, String(n)));
  }
  unitsList.forEach((u, i) => {
    const y = 20 + i * (barH + gap);
    svg.append(s("text", { x: labelW - 8, y: y + barH / 2 + 5, "text-anchor": "end", class: "unit-label" }, u));
    let at = 0;
    rules.forEach((r, k) => {
      const n = violations.filter((v) => v.unit === u && v.rule === r).reduce((m, v) => m + Number(v.violations), 0);
      if (!n) return;
      const rect = s("rect", { x: x(at), y, width: Math.max(1, x(at + n) - x(at)), height: barH, fill: RULE_COLOURS[k % RULE_COLOURS.length] });
      rect.append(s("title", {}, `${u} · ${t(`rule.${r}`)}: ${n}`));
      svg.append(rect);
      if (x(at + n) - x(at) > 22) svg.append(s("text", { x: (x(at) + x(at + n)) / 2, y: y + barH / 2 + 4, "text-anchor": "middle", class: "bar-value" }, String(n)));
      at += n;
    });
    svg.append(s("text", { x: x(at) + 6, y: y + barH / 2 + 4, class: "bar-total" }, String(totals[i])));
  });
  rules.forEach((r, k) => {
    const lx = labelW + (k % 3) * 190;
    const ly = axisY + 36 + Math.floor(k / 3) * 24;
    svg.append(s("rect", { x: lx, y: ly - 11, width: 14, height: 14, fill: RULE_COLOURS[k % RULE_COLOURS.length] }));
    svg.append(s("text", { x: lx + 20, y: ly, class: "legend-label" }, t(`rule.${r}`)));
  });
  return svg;
}

/** A whole-number tick step giving about five ticks up to `max`. */
function niceStep(max) {
  const raw = Math.max(1, max / 5);
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return Math.max(1, m * mag);
  return 10 * mag;
}
