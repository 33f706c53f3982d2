// DOM and time helpers shared by the views.
//
// Every text from the server goes through textContent (h() below), never innerHTML: plates,
// unit names and comments are data, and data must not become markup.

const CHINA_OFFSET_MS = 8 * 3600 * 1000; // China has no daylight saving time: UTC+8 all year

/** h("tag.class#id", {attrs, on: {click}}, ...children) -> Element */
export function h(spec, attrs, ...children) {
  const [, tag, rest] = /^([a-z0-9]+)(.*)$/i.exec(spec);
  const el = document.createElement(tag);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === ".") el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "on") {
      for (const [name, fn] of Object.entries(value)) el.addEventListener(name, fn);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key in el && typeof value !== "string") {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** A Date (or ISO string, or ms) as China time "YYYY-MM-DD HH:MM:SS". */
export function chinaTime(value, { seconds = true } = {}) {
  if (value === null || value === undefined || value === "") return "";
  const ms = value instanceof Date ? value.getTime() : typeof value === "number" ? value : Date.parse(value);
  if (Number.isNaN(ms)) return String(value);
  const d = new Date(ms + CHINA_OFFSET_MS);
  const p = (n) => String(n).padStart(2, "0");
  const text = `${d.getUTCFullYear()}-${p(d.getUTCMonth() + 1)}-${p(d.getUTCDate())} ${p(d.getUTCHours())}:${p(d.getUTCMinutes())}`;
  return seconds ? `${text}:${p(d.getUTCSeconds())}` : text;
}

/** The value of an <input type="datetime-local"> for a moment, in China time. */
export function toLocalInput(value) {
  return chinaTime(value, { seconds: false }).replace(" ", "T");
}

/** An <input type="datetime-local"> value read as China time -> ISO 8601 with +08:00. */
export function fromLocalInput(text) {
  if (!text) return null;
  return (text.length === 16 ? `${text}:00` : text) + "+08:00";
}

/** The current China-time month as YYYY-MM. */
export function chinaMonth(ms = Date.now()) {
  return chinaTime(ms).slice(0, 7);
}

/** The start of the current China-time day, as ms. */
export function chinaMidnight(ms = Date.now()) {
  const day = Math.floor((ms + CHINA_OFFSET_MS) / 86400000);
  return day * 86400000 - CHINA_OFFSET_MS;
}

export function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const d = Math.floor(s / 86400);
  const hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${hh}h ${mm}m` : hh ? `${hh}h ${mm}m` : `${mm}m ${s % 60}s`;
}

export function fmtNumber(value, digits = 1) {
  return value === null || value === undefined ? "" : Number(value).toFixed(digits);
}

/** Debounce fn by ms. */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Query parameters of the hash route ("#/track?vehicle=3") as an object. */
export function hashParams() {
  const q = location.hash.split("?")[1] || "";
  return Object.fromEntries(new URLSearchParams(q));
}
