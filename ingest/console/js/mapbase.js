// Leaflet maps for the console: the base map (tiles from the configured template, or a plain
// background), fences from GeoJSON, and the vehicle layer.
//
// The vehicle layer is one <canvas> of our own rather than one Leaflet marker per vehicle:
// 10,000 markers are 10,000 objects to move every second, while this layer keeps positions in
// typed arrays (Web Mercator at zoom 0, so a redraw is one multiply-add per vehicle) and draws
// all dots of one colour as one path.  Below CLUSTER_BELOW_ZOOM vehicles are aggregated per
// screen grid cell into a disc with the count and a ring showing the share of each state; a
// vehicle alone in its cell is drawn as itself.

const L = window.L;

export const KUNMING = [25.04, 102.71];

export const STATES = ["moving", "parked", "offline", "alert"];
export const STATE_COLOURS = {
  moving: "#16a34a",
  parked: "#2563eb",
  offline: "#9ca3af",
  alert: "#dc2626",
};
const STATE_CODE = Object.fromEntries(STATES.map((s, i) => [s, i]));

export const FENCE_STYLES = {
  permitted: { color: "#0f766e", weight: 2, fillOpacity: 0.05, dashArray: "6 4" },
  forbidden: { color: "#b91c1c", weight: 2, fillOpacity: 0.15 },
  parking: { color: "#7c3aed", weight: 2, fillOpacity: 0.12 },
  destination: { color: "#a16207", weight: 2, fillOpacity: 0.08 },
};

// Grid cell for aggregation, in CSS pixels: about a fingertip, so a cluster is a click target.
const CELL_PX = 44;
// From this zoom on (a few streets on screen) every vehicle is drawn one by one.
const CLUSTER_BELOW_ZOOM = 14;
const DOT_RADIUS = 5;

/** A Leaflet map in `el`: tiles when the configuration names a source, else none. */
export function createMap(el, config, { zoom = 11, center = KUNMING } = {}) {
  const map = L.map(el, { zoomControl: true, preferCanvas: true, worldCopyJump: false });
  map.setView(center, zoom);
  if (config && config.tile_url) {
    L.tileLayer(config.tile_url, {
      attribution: config.tile_attribution || "",
      maxZoom: 19,
      subdomains: config.tile_subdomains || "abc",
    }).addTo(map);
  } else {
    el.classList.add("no-tiles");
  }
  map.attributionControl.setPrefix(false);
  return map;
}

/** The fences of a FeatureCollection, styled by kind, with their name as tooltip. */
export function fenceLayer(collection, label) {
  return L.geoJSON(collection, {
    style: (feature) => FENCE_STYLES[(feature.properties || {}).kind] || FENCE_STYLES.destination,
    pointToLayer: (feature, latlng) => {
      const radius = Number((feature.properties || {}).radius_m) || 0;
      return radius > 0 ? L.circle(latlng, { radius }) : L.circleMarker(latlng, { radius: 6 });
    },
    onEachFeature: (feature, layer) => {
      const p = feature.properties || {};
      layer.bindTooltip(label ? label(p) : p.name || "", { sticky: true });
    },
  });
}

/** A growable store of vehicles: id -> slot, coordinates in typed arrays. */
class VehicleStore {
  constructor() {
    this.index = new Map();
    this.records = [];
    this.capacity = 0;
    this.size = 0;
    this.grow(1024);
  }

  grow(capacity) {
    const x = new Float64Array(capacity);
    const y = new Float64Array(capacity);
    const state = new Uint8Array(capacity);
    if (this.size) {
      x.set(this.x.subarray(0, this.size));
      y.set(this.y.subarray(0, this.size));
      state.set(this.state.subarray(0, this.size));
    }
    Object.assign(this, { x, y, state, capacity });
  }

  put(crs, record) {
    let slot = this.index.get(record.vehicle_id);
    if (slot === undefined) {
      if (this.size === this.capacity) this.grow(this.capacity * 2);
      slot = this.size++;
      this.index.set(record.vehicle_id, slot);
    }
    this.records[slot] = record;
    if (record.lat === null || record.lon === null || record.lat === undefined) {
      this.x[slot] = NaN;
      this.y[slot] = NaN;
    } else {
      const p = crs.latLngToPoint(L.latLng(record.lat, record.lon), 0);
      this.x[slot] = p.x;
      this.y[slot] = p.y;
    }
    this.state[slot] = STATE_CODE[record.state] ?? STATE_CODE.parked;
    return slot;
  }

  clear() {
    this.index.clear();
    this.records = [];
    this.size = 0;
  }
}

export const VehicleLayer = L.Layer.extend({
  initialize(options) {
    L.setOptions(this, options);
    this.store = new VehicleStore();
    this.selected = null;
    this.hidden = new Set(); // states switched off in the legend
    this._frame = null;
    this._cells = [];
    this.stats = { draws: 0, lastDrawMs: 0, onDraw: null };
  },

  onAdd(map) {
    this._map = map;
    const pane = map.getPane("vehicles") || map.createPane("vehicles");
    pane.style.zIndex = 450;
    pane.style.pointerEvents = "none";
    this._canvas = L.DomUtil.create("canvas", "vehicle-canvas", pane);
    this._ctx = this._canvas.getContext("2d");
    map.on("moveend viewreset resize", this._reset, this);
    map.on("zoomstart", this._hide, this);
    map.on("click", this._click, this);
    map.on("mousemove", this._hover, this);
    this._reset();
  },

  onRemove(map) {
    map.off("moveend viewreset resize", this._reset, this);
    map.off("zoomstart", this._hide, this);
    map.off("click", this._click, this);
    map.off("mousemove", this._hover, this);
    if (this._frame) cancelAnimationFrame(this._frame);
    this._canvas.remove();
  },

  /** Replace every vehicle (a snapshot). */
  setAll(records) {
    this.store.clear();
    const crs = this._crs();
    for (const r of records) this.store.put(crs, r);
    this.redraw();
  },

  /** Update or add the given vehicles. */
  update(records) {
    const crs = this._crs();
    for (const r of records) this.store.put(crs, r);
    this.redraw();
  },

  record(id) {
    const slot = this.store.index.get(id);
    return slot === undefined ? null : this.store.records[slot];
  },

  records() {
    return this.store.records.slice(0, this.store.size);
  },

  select(id) {
    this.selected = id;
    this.redraw();
  },

  setHidden(states) {
    this.hidden = new Set(states);
    this.redraw();
  },

  /** The bounds of every placed vehicle, or null. */
  bounds() {
    const s = this.store;
    let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
    for (let i = 0; i < s.size; i++) {
      const x = s.x[i], y = s.y[i];
      if (Number.isNaN(x)) continue;
      if (x < minX) minX = x;
      if (x > maxX) maxX = x;
      if (y < minY) minY = y;
      if (y > maxY) maxY = y;
    }
    if (minX === Infinity) return null;
    const crs = this._crs();
    return L.latLngBounds(crs.pointToLatLng(L.point(minX, maxY), 0), crs.pointToLatLng(L.point(maxX, minY), 0));
  },

  /** Schedule one redraw for the next frame (updates arriving together draw once). */
  redraw() {
    if (!this._map || this._frame) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      this._draw();
    });
  },

  _crs() {
    return (this._map && this._map.options.crs) || L.CRS.EPSG3857;
  },

  _hide() {
    if (this._canvas) this._canvas.style.visibility = "hidden";
  },

  _reset() {
    const map = this._map;
    const size = map.getSize();
    const ratio = window.devicePixelRatio || 1;
    const canvas = this._canvas;
    L.DomUtil.setPosition(canvas, map.containerPointToLayerPoint([0, 0]));
    if (canvas.width !== Math.round(size.x * ratio) || canvas.height !== Math.round(size.y * ratio)) {
      canvas.width = Math.round(size.x * ratio);
      canvas.height = Math.round(size.y * ratio);
      canvas.style.width = `${size.x}px`;
      canvas.style.height = `${size.y}px`;
    }
    canvas.style.visibility = "";
    if (this._frame) cancelAnimationFrame(this._frame);
    this._frame = null;
    this._draw();
  },

  _draw() {
    const started = performance.now();
    const map = this._map;
    const ctx = this._ctx;
    const ratio = window.devicePixelRatio || 1;
    const size = map.getSize();
    // Between moveends the canvas stays where _reset put it (it moves with the map pane while
    // dragging): project against that position.
    const canvasPos = L.DomUtil.getPosition(this._canvas);
    const zoom = map.getZoom();
    const scale = this._crs().scale(zoom) / this._crs().scale(0);
    const origin = map.getPixelOrigin();
    const ox = origin.x + canvasPos.x;
    const oy = origin.y + canvasPos.y;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, size.x, size.y);

    const s = this.store;
    const hidden = this.hidden;
    const margin = CELL_PX;
    const cluster = zoom < CLUSTER_BELOW_ZOOM;
    const cols = Math.ceil((size.x + 2 * margin) / CELL_PX);
    const cells = new Map();
    const singles = [[], [], [], []];
    const drawn = [];
    for (let i = 0; i < s.size; i++) {
      const state = s.state[i];
      if (hidden.size && hidden.has(STATES[state])) continue;
      const px = s.x[i] * scale - ox;
      const py = s.y[i] * scale - oy;
      if (!(px > -margin && py > -margin && px < size.x + margin && py < size.y + margin)) continue;
      if (!cluster) {
        singles[state].push(i);
        drawn.push({ x: px, y: py, n: 1, slot: i });
        continue;
      }
      const key = Math.floor((py + margin) / CELL_PX) * cols + Math.floor((px + margin) / CELL_PX);
      let cell = cells.get(key);
      if (cell === undefined) {
        cell = { n: 0, sx: 0, sy: 0, counts: [0, 0, 0, 0], first: i };
        cells.set(key, cell);
      }
      cell.n++;
      cell.sx += px;
      cell.sy += py;
      cell.counts[state]++;
    }
    for (const cell of cells.values()) {
      const x = cell.sx / cell.n;
      const y = cell.sy / cell.n;
      if (cell.n === 1) {
        singles[s.state[cell.first]].push(cell.first);
        drawn.push({ x, y, n: 1, slot: cell.first });
      } else {
        drawn.push({ x, y, n: cell.n, counts: cell.counts });
      }
    }

    // One path per state: 10,000 arcs filled four times, not 10,000 times.
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "#ffffff";
    for (let st = 0; st < 4; st++) {
      const list = singles[st];
      if (!list.length) continue;
      ctx.beginPath();
      for (const i of list) {
        const px = s.x[i] * scale - ox;
        const py = s.y[i] * scale - oy;
        ctx.moveTo(px + DOT_RADIUS, py);
        ctx.arc(px, py, DOT_RADIUS, 0, 2 * Math.PI);
      }
      ctx.fillStyle = STATE_COLOURS[STATES[st]];
      ctx.fill();
      ctx.stroke();
    }
    // Heading ticks for moving vehicles when zoomed in.
    if (!cluster && singles[0].length < 3000) {
      ctx.beginPath();
      for (const i of singles[0]) {
        const r = s.records[i];
        const a = ((Number(r.direction) || 0) * Math.PI) / 180;
        const px = s.x[i] * scale - ox;
        const py = s.y[i] * scale - oy;
        ctx.moveTo(px + Math.sin(a) * DOT_RADIUS, py - Math.cos(a) * DOT_RADIUS);
        ctx.lineTo(px + Math.sin(a) * (DOT_RADIUS + 6), py - Math.cos(a) * (DOT_RADIUS + 6));
      }
      ctx.strokeStyle = STATE_COLOURS.moving;
      ctx.lineWidth = 2;
      ctx.stroke();
    }
    // Clusters: a white disc, a ring split by state, the count.
    ctx.font = "bold 11px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    for (const c of drawn) {
      if (c.n === 1) continue;
      const radius = Math.min(24, 10 + 2.2 * Math.log2(c.n));
      ctx.beginPath();
      ctx.arc(c.x, c.y, radius, 0, 2 * Math.PI);
      ctx.fillStyle = "rgba(255,255,255,0.92)";
      ctx.fill();
      let angle = -Math.PI / 2;
      ctx.lineWidth = 5;
      for (let st = 0; st < 4; st++) {
        if (!c.counts[st]) continue;
        const sweep = (2 * Math.PI * c.counts[st]) / c.n;
        ctx.beginPath();
        ctx.arc(c.x, c.y, radius - 2.5, angle, angle + sweep);
        ctx.strokeStyle = STATE_COLOURS[STATES[st]];
        ctx.stroke();
        angle += sweep;
      }
      ctx.fillStyle = "#111827";
      ctx.fillText(c.n > 9999 ? `${Math.round(c.n / 1000)}k` : String(c.n), c.x, c.y);
    }
    // The selected vehicle: a ring, drawn last so nothing covers it.
    if (this.selected !== null) {
      const slot = s.index.get(this.selected);
      if (slot !== undefined && !Number.isNaN(s.x[slot])) {
        const px = s.x[slot] * scale - ox;
        const py = s.y[slot] * scale - oy;
        ctx.beginPath();
        ctx.arc(px, py, DOT_RADIUS + 5, 0, 2 * Math.PI);
        ctx.strokeStyle = "#f59e0b";
        ctx.lineWidth = 3;
        ctx.stroke();
      }
    }
    this._cells = drawn;
    this.stats.draws++;
    this.stats.lastDrawMs = performance.now() - started;
    if (this.stats.onDraw) this.stats.onDraw(this.stats.lastDrawMs);
  },

  /** The drawn item (vehicle or cluster) under a container point, or null. */
  _hit(point) {
    const canvasPos = L.DomUtil.getPosition(this._canvas);
    const layer = this._map.containerPointToLayerPoint(point);
    const x = layer.x - canvasPos.x;
    const y = layer.y - canvasPos.y;
    let best = null;
    let bestD = Infinity;
    for (const c of this._cells) {
      const radius = c.n === 1 ? DOT_RADIUS + 5 : Math.min(24, 10 + 2.2 * Math.log2(c.n));
      const d = Math.hypot(c.x - x, c.y - y);
      if (d <= radius && d < bestD) {
        best = c;
        bestD = d;
      }
    }
    return best;
  },

  _click(event) {
    const hit = this._hit(event.containerPoint);
    if (!hit) {
      if (this.options.onSelect) this.options.onSelect(null);
      return;
    }
    if (hit.n > 1) {
      const map = this._map;
      const canvasPos = L.DomUtil.getPosition(this._canvas);
      const latlng = map.layerPointToLatLng(L.point(hit.x + canvasPos.x, hit.y + canvasPos.y));
      map.setView(latlng, Math.min(map.getMaxZoom(), map.getZoom() + 2));
      return;
    }
    const record = this.store.records[hit.slot];
    if (this.options.onSelect) this.options.onSelect(record);
  },

  _hover(event) {
    const hit = this._hit(event.containerPoint);
    this._map.getContainer().style.cursor = hit ? "pointer" : "";
  },
});
