// The console's shell: session (login form, logout), the hash router, the header (clock in China
// time, language switch, live alert badge) and the one alert stream every view shares.

import { api, eventStream, setUnauthorizedHandler, ApiError } from "./api.js";
import { applyTranslations, lang, setLang, t } from "./i18n.js";
import { chinaTime } from "./util.js";
import * as liveMap from "./views/live.js";
import * as track from "./views/track.js";
import * as alerts from "./views/alerts.js";
import * as filings from "./views/filings.js";
import * as fleet from "./views/fleet.js";
import * as reports from "./views/reports.js";

const VIEWS = { map: liveMap, track, alerts, filings, fleet, reports };
const ROLE_RANK = { viewer: 0, dispatcher: 1, admin: 2 };
// What each action needs (the server checks the same in ingest/access.py; the page only hides
// what would be refused).
const NEEDS = { file: "dispatcher", note: "dispatcher", editVehicle: "admin" };

/** One /alerts/stream for the whole page: views subscribe instead of opening their own (the
 * server caps the streams one user may hold). */
class AlertBus {
  constructor() {
    this.listeners = new Set();
    this.source = null;
    this.unseen = 0;
    this.state = "connecting";
  }

  start() {
    this.stop();
    this.source = eventStream("/alerts/stream", {}, { message: (alert) => this.emit(alert) }, (state) => {
      this.state = state;
      for (const fn of this.listeners) fn(null, state);
    });
  }

  stop() {
    if (this.source) this.source.close();
    this.source = null;
  }

  emit(alert) {
    if (!alert || !alert.id) return;
    const watching = current && current.name === "alerts";
    if (!watching && (alert.state === "open" || alert.state === "pending_backfill")) {
      this.unseen++;
      badge();
    }
    for (const fn of this.listeners) fn(alert, this.state);
  }

  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  seen() {
    this.unseen = 0;
    badge();
  }
}

const ctx = {
  user: null,
  config: { tile_url: null, tile_attribution: "", offline_after_s: 600 },
  alerts: new AlertBus(),
  can(action) {
    return !!this.user && (ROLE_RANK[this.user.role] ?? -1) >= ROLE_RANK[NEEDS[action]];
  },
};
window.jt808Console = ctx; // for the browser tests and benchmarks: stats, state

let current = null; // { name, unmount }

function badge() {
  const el = document.getElementById("alert-badge");
  el.hidden = ctx.alerts.unseen === 0;
  el.textContent = String(ctx.alerts.unseen);
}

function showLogin(message) {
  ctx.alerts.stop();
  unmount();
  ctx.user = null;
  document.getElementById("shell").hidden = true;
  document.getElementById("login").hidden = false;
  const error = document.getElementById("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  document.getElementById("login-token").focus();
}

async function showShell(user) {
  ctx.user = user;
  document.getElementById("login").hidden = true;
  document.getElementById("shell").hidden = false;
  const who = document.getElementById("whoami");
  who.textContent = `${user.name} · ${t(`role.${user.role}`)}${user.unit ? ` · ${user.unit}` : ""}`;
  who.dataset.role = user.role;
  try {
    ctx.config = { ...ctx.config, ...(await api("/console/config.json")) };
  } catch (error) {
    console.warn("config.json:", error); // the defaults draw a plain background
  }
  ctx.alerts.start();
  route();
}

function unmount() {
  if (current && current.unmount) current.unmount();
  current = null;
}

function route() {
  if (!ctx.user) return;
  const path = (location.hash.replace(/^#\/?/, "").split("?")[0] || "map").split("/");
  const name = VIEWS[path[0]] ? path[0] : "map";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === name);
  unmount();
  const el = document.getElementById("view");
  el.replaceChildren();
  el.className = `view view-${name}`;
  const unmountView = VIEWS[name].mount(el, ctx, path.slice(1));
  current = { name, unmount: unmountView };
  if (name === "alerts") ctx.alerts.seen();
}

function relabel() {
  for (const b of document.querySelectorAll(".lang-switch")) b.textContent = lang() === "zh" ? "English" : "中文";
  applyTranslations(document);
  if (ctx.user) {
    const who = document.getElementById("whoami");
    who.textContent = `${ctx.user.name} · ${t(`role.${ctx.user.role}`)}${ctx.user.unit ? ` · ${ctx.user.unit}` : ""}`;
  }
}

async function login(event) {
  event.preventDefault();
  const input = document.getElementById("login-token");
  try {
    const user = await api("/session", { method: "POST", body: { token: input.value.trim() }, quiet401: true });
    input.value = "";
    await showShell(user);
  } catch (error) {
    const status = error instanceof ApiError ? error.status : 0;
    showLogin(status === 401 ? t("login.refused") : status === 429 ? t("login.locked") : t("login.failed", { error: error.message }));
  }
}

async function logout() {
  try {
    await api("/session", { method: "DELETE", quiet401: true });
  } finally {
    showLogin(null);
  }
}

async function start() {
  relabel();
  setUnauthorizedHandler(() => showLogin(t("login.expired")));
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  for (const b of document.querySelectorAll(".lang-switch")) {
    b.addEventListener("click", () => {
      setLang(lang() === "zh" ? "en" : "zh");
      relabel();
      route();
    });
  }
  window.addEventListener("hashchange", route);
  const clock = document.getElementById("clock");
  const tick = () => (clock.textContent = `${chinaTime(Date.now())} (UTC+8)`);
  tick();
  setInterval(tick, 1000);
  try {
    await showShell(await api("/session", { quiet401: true }));
  } catch {
    showLogin(null);
  }
}

start();
