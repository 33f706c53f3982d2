// The filing form (article 21): a new filing, a correction of one (with its id), or the
// back-filing of the trip an alert is about.  POST /filings; the platform stamps the receipt.

import { api, ApiError } from "./api.js";
import { t } from "./i18n.js";
import { fromLocalInput, h, toLocalInput } from "./util.js";

/**
 * A <form> for `initial` ({plate, start, end, destination, purpose, passengers, approver, id?});
 * onSaved(id) after a 201.  Destinations are the fences of kind "destination".
 */
export function filingForm(initial, onSaved, { plates = [], destinations = [] } = {}) {
  const field = (name, input) => h("label", { dataset: { field: name } }, h("span", t(`filing.${name}`)), input);
  const plate = h("input", { name: "plate", value: initial.plate || "", required: true, list: "filing-plates" });
  const start = h("input", { name: "start", type: "datetime-local", value: initial.start ? toLocalInput(initial.start) : "", required: true });
  const end = h("input", { name: "end", type: "datetime-local", value: initial.end ? toLocalInput(initial.end) : "", required: true });
  const destination = h(
    "select",
    { name: "destination" },
    h("option", { value: "" }, t("filing.no_destination")),
    destinations.map((name) => h("option", { value: name }, name)),
  );
  destination.value = initial.destination || "";
  const purpose = h("input", { name: "purpose", value: initial.purpose || "", required: true });
  const passengers = h("input", { name: "passengers", value: initial.passengers || "", required: true });
  const approver = h("input", { name: "approver", value: initial.approver || "", required: true });
  const problems = h("ul.error.problems");
  const submit = h("button.primary", { type: "submit" }, initial.id ? t("filing.save_correction") : t("filing.submit"));
  const form = h(
    "form.card.filing-form",
    h("h3", initial.id ? t("filing.correct_title", { id: initial.id }) : t("filing.new_title")),
    h("datalist#filing-plates", plates.map((p) => h("option", { value: p }))),
    field("plate", plate),
    field("start", start),
    field("end", end),
    field("destination", destination),
    field("purpose", purpose),
    field("passengers", passengers),
    field("approver", approver),
    h("p.hint", t("filing.times_hint")),
    submit,
    problems,
  );
  if (initial.id) plate.readOnly = true;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problems.replaceChildren();
    const body = {
      plate: plate.value.trim(),
      start: fromLocalInput(start.value),
      end: fromLocalInput(end.value),
      destination: destination.value || null,
      purpose: purpose.value.trim(),
      passengers: passengers.value.trim(),
      approver: approver.value.trim(),
    };
    if (initial.id) body.id = initial.id;
    if (body.end <= body.start) {
      problems.append(h("li", t("filing.end_before_start")));
      return;
    }
    submit.disabled = true;
    try {
      const answer = await api("/filings", { method: "POST", body });
      const id = answer && answer.ids ? answer.ids[0] : null;
      onSaved(id);
    } catch (error) {
      const list = error instanceof ApiError ? error.problems : [error.message];
      problems.append(...list.map((p) => h("li", p)));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

/** The names of the destination fences (for the form's select). */
export async function destinationNames() {
  try {
    const fc = await api("/fences");
    return (fc.features || [])
      .filter((f) => (f.properties || {}).kind === "destination")
      .map((f) => f.properties.name)
      .filter(Boolean);
  } catch {
    return [];
  }
}
