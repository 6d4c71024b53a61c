// Unconfused: live training feedback in the ComfyUI page.
//
// Listens to the pack's server messages (engine/messages.py documents the contract):
//   unconfused.train       {node_id, node, step, total, loss, lr, eta_seconds}
//   unconfused.validation  {node_id, node, step, prompts, images: [{filename, subfolder, type}]}
//   unconfused.masks       {node_id, node, step, labels, images: [{filename, subfolder, type}]}
// and shows on the graph node that sent them a loss chart (raw + smoothed), step / ETA text,
// the latest validation pictures or EM masks, and a Cancel button that is ComfyUI's own
// interrupt. Only public extension APIs are used (app.registerExtension, api.addEventListener,
// node.addDOMWidget, onDrawForeground); a missing feature means less is shown, never an error.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENTS = ["train", "validation", "masks"];
const LIVE_TYPES = /^Unconfused(Train|.*EM)/; // nodes that get the panel before their first message
const PANEL_HEIGHT = 250;
const SMOOTHING = 0.9; // exponential moving average, bias-corrected (TensorBoard style)
const MAX_POINTS = 5000; // older points are thinned out beyond this

function warnOnce(what, err, level = "warn") {
  warnOnce.seen = warnOnce.seen || new Set();
  if (warnOnce.seen.has(what)) return;
  warnOnce.seen.add(what);
  console[level](`[unconfused] ${what}:`, err);
}

function newState() {
  return { points: [], smooth: [], ema: 0, step: 0, total: 0, loss: null, lr: null, eta: null, node: "",
           pictures: [], pictureKind: "", pictureStep: 0, done: false, stopped: "", panel: null };
}

// Bias-corrected exponential moving average of the points (TensorBoard's smoothing).
function pushSmooth(st, step, loss) {
  st.ema = SMOOTHING * st.ema + (1 - SMOOTHING) * loss;
  const n = st.smooth.length + 1;
  st.smooth.push([step, st.ema / (1 - Math.pow(SMOOTHING, n))]);
}

function recomputeSmooth(st) {
  st.ema = 0;
  st.smooth = [];
  for (const [s, l] of st.points) pushSmooth(st, s, l);
}

function formatEta(seconds) {
  if (seconds == null || !isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function formatNumber(x) {
  if (x == null || !isFinite(x)) return "-";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toPrecision(4);
}

function statusText(st) {
  if (!st.total) return st.preparing ? "preparing (loading the model, caching latents)" : "waiting for training to start";
  let text = `step ${st.step}/${st.total}  ·  loss ${formatNumber(st.loss)}  ·  lr ${formatNumber(st.lr)}`;
  if (st.stopped) text += `  ·  ${st.stopped}`;
  else if (st.done) text += "  ·  done";
  else if (st.eta != null) text += `  ·  ETA ${formatEta(st.eta)}`;
  return text;
}

function viewUrl(ref) {
  const q = new URLSearchParams({ filename: ref.filename ?? "", subfolder: ref.subfolder ?? "",
                                  type: ref.type ?? "temp" });
  const route = `/view?${q.toString()}`;
  return typeof api.apiURL === "function" ? api.apiURL(route) : route;
}

// ------------------------------------------------------------------ chart
function drawChart(ctx, x, y, w, h, st) {
  ctx.save();
  ctx.fillStyle = "#1b1b1f";
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = "#3a3a44";
  ctx.lineWidth = 1;
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  const pts = st.points;
  ctx.font = "10px sans-serif";
  if (pts.length === 0) {
    ctx.fillStyle = "#888";
    ctx.fillText("loss chart: waiting for the first step", x + 8, y + h / 2);
    ctx.restore();
    return;
  }
  let lo = Infinity, hi = -Infinity;
  for (const [, l] of pts) { if (l < lo) lo = l; if (l > hi) hi = l; }
  if (hi - lo < 1e-12) { hi += 0.5 * (Math.abs(hi) || 1); lo -= 0.5 * (Math.abs(lo) || 1); }
  const pad = 16, x0 = x + pad + 24, x1 = x + w - pad, y0 = y + pad, y1 = y + h - pad;
  const xmax = Math.max(st.total, pts[pts.length - 1][0], 1), xmin = Math.min(pts[0][0], xmax - 1);
  const sx = (s) => x0 + ((s - xmin) / Math.max(xmax - xmin, 1)) * (x1 - x0);
  const sy = (l) => y1 - ((l - lo) / (hi - lo)) * (y1 - y0);
  const line = (series, color, width) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    series.forEach(([s, l], i) => (i ? ctx.lineTo(sx(s), sy(l)) : ctx.moveTo(sx(s), sy(l))));
    if (series.length === 1) ctx.lineTo(sx(series[0][0]) + 2, sy(series[0][1]));
    ctx.stroke();
  };
  line(pts, "rgba(110,160,255,0.45)", 1);
  line(st.smooth, "#ffb347", 2);
  ctx.fillStyle = "#aaa";
  ctx.fillText(formatNumber(hi), x + 4, y0 + 4);
  ctx.fillText(formatNumber(lo), x + 4, y1);
  ctx.fillText(`${xmax}`, x1 - 24, y + h - 4);
  ctx.fillStyle = "#ffb347";
  ctx.fillText("smoothed", x1 - 110, y0 + 4);
  ctx.fillStyle = "rgba(110,160,255,0.9)";
  ctx.fillText("raw", x1 - 50, y0 + 4);
  ctx.restore();
}

// ------------------------------------------------------------------ DOM panel
function makePanel(node, st) {
  const root = document.createElement("div");
  root.className = "unconfused-live";
  root.dataset.nodeId = String(node.id);
  Object.assign(root.style, { display: "flex", flexDirection: "column", gap: "4px", boxSizing: "border-box",
                              font: "11px sans-serif", color: "#ddd", overflow: "hidden" });
  const head = document.createElement("div");
  Object.assign(head.style, { display: "flex", alignItems: "center", gap: "6px" });
  const status = document.createElement("span");
  status.className = "unconfused-status";
  Object.assign(status.style, { flex: "1", whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
  const cancel = document.createElement("button");
  cancel.textContent = "Cancel";
  cancel.title = "Stop training (ComfyUI's Cancel); the run keeps a checkpoint and resumes when queued again";
  Object.assign(cancel.style, { fontSize: "11px", padding: "1px 6px", cursor: "pointer" });
  cancel.addEventListener("click", (e) => {
    e.stopPropagation();
    interrupt();
  });
  head.append(status, cancel);
  const canvas = document.createElement("canvas");
  canvas.className = "unconfused-chart";
  Object.assign(canvas.style, { width: "100%", height: "130px", flex: "0 0 130px" });
  const pictures = document.createElement("div");
  pictures.className = "unconfused-pictures";
  Object.assign(pictures.style, { display: "flex", gap: "4px", flex: "1", minHeight: "0", overflow: "hidden" });
  root.append(head, canvas, pictures);
  return { root, status, cancel, canvas, pictures };
}

function interrupt() {
  try {
    const done = typeof api.interrupt === "function" ? api.interrupt() : api.fetchApi("/interrupt", { method: "POST" });
    Promise.resolve(done).catch((err) => warnOnce("cancel failed", err));
  } catch (err) {
    warnOnce("cancel failed", err);
  }
}

function renderPanel(st) {
  const p = st.panel;
  if (!p) return;
  p.status.textContent = statusText(st);
  if (p.node) p.root.dataset.nodeId = String(p.node.id);
  p.root.dataset.points = String(st.points.length);
  p.root.dataset.step = String(st.step);
  p.root.dataset.total = String(st.total);
  p.cancel.disabled = st.done || !!st.stopped || !st.total;
  p.root.dataset.stopped = st.stopped;
  const rect = p.canvas.getBoundingClientRect();
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(Math.round((rect.width || 300) * ratio), 50);
  const h = Math.max(Math.round((rect.height || 130) * ratio), 30);
  if (p.canvas.width !== w || p.canvas.height !== h) {
    p.canvas.width = w;
    p.canvas.height = h;
  }
  const ctx = p.canvas.getContext("2d");
  if (ctx) {
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    drawChart(ctx, 0, 0, w / ratio, h / ratio, st);
  }
  if (p.shownPictures !== st.pictures) {
    p.shownPictures = st.pictures;
    p.pictures.replaceChildren(...st.pictures.map((pic) => {
      const fig = document.createElement("figure");
      Object.assign(fig.style, { margin: "0", flex: "1 1 0", minWidth: "0", display: "flex",
                                 flexDirection: "column", alignItems: "center" });
      const img = document.createElement("img");
      img.src = pic.url;
      img.alt = pic.caption;
      img.title = `${st.pictureKind} at step ${st.pictureStep}: ${pic.caption}`;
      Object.assign(img.style, { maxWidth: "100%", maxHeight: "80px", objectFit: "contain" });
      img.addEventListener("error", () => { img.style.visibility = "hidden"; });
      const cap = document.createElement("figcaption");
      cap.textContent = pic.caption;
      Object.assign(cap.style, { fontSize: "9px", color: "#aaa", whiteSpace: "nowrap", overflow: "hidden",
                                 textOverflow: "ellipsis", maxWidth: "100%" });
      fig.append(img, cap);
      return fig;
    }));
  }
}

// ------------------------------------------------------------------ attaching to nodes
function attach(node) {
  // the state lives on the node: at nodeCreated the node has no graph id yet
  if (node.__unconfused) return node.__unconfused;
  const st = (node.__unconfused = newState());
  if (typeof node.addDOMWidget === "function") {
    try {
      const panel = makePanel(node, st);
      panel.node = node;
      const widget = node.addDOMWidget("unconfused_live", "unconfused-live", panel.root, {
        serialize: false,
        hideOnZoom: false,
        getValue: () => undefined,
        setValue: () => {},
        getMinHeight: () => PANEL_HEIGHT,
        getMaxHeight: () => PANEL_HEIGHT,
        getHeight: () => PANEL_HEIGHT,
      });
      if (widget) widget.serialize = false; // not part of the saved workflow
      st.panel = panel;
      const size = node.computeSize?.();
      if (size && node.size && node.setSize) node.setSize([Math.max(node.size[0], size[0], 320), Math.max(node.size[1], size[1])]);
      renderPanel(st);
      return st;
    } catch (err) {
      // e.g. a frontend whose DOM widgets work differently: fall back quietly
      warnOnce("the live panel could not be added; drawing on the node instead", err, "info");
    }
  }
  // No DOM widgets in this frontend: draw the text and the chart under the node's widgets.
  const draw = node.onDrawForeground;
  node.onDrawForeground = function (ctx) {
    const r = draw?.apply(this, arguments);
    try {
      const s = this.__unconfused;
      if (s && s.total && !this.flags?.collapsed) {
        const w = this.size[0], h = 110, y = this.size[1] - h - 4;
        ctx.save();
        ctx.fillStyle = "#ddd";
        ctx.font = "11px sans-serif";
        ctx.fillText(statusText(s), 8, y - 4);
        ctx.restore();
        drawChart(ctx, 6, y, w - 12, h, s);
      }
    } catch (err) {
      warnOnce("drawing the chart failed", err);
    }
    return r;
  };
  if (node.size) node.size[1] += 130;
  return st;
}

function findNode(nodeId) {
  const graph = app?.graph;
  if (!graph || nodeId == null || typeof graph.getNodeById !== "function") return null;
  const id = String(nodeId);
  const asKey = (v) => (isNaN(+v) ? v : +v);
  let node = graph.getNodeById(asKey(id));
  if (!node && id.includes(":")) node = graph.getNodeById(asKey(id.split(":")[0])); // inside a group node / subgraph
  return node ?? null;
}

function stateFor(data) {
  const node = findNode(data?.node_id);
  if (!node) return null;
  const st = attach(node);
  return { node, st };
}

function redraw(node) {
  try {
    node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas?.(true, true);
  } catch (err) {
    warnOnce("redraw failed", err);
  }
}

// ------------------------------------------------------------------ messages
function onTrain(data) {
  const found = stateFor(data);
  if (!found) return;
  const { node, st } = found;
  const step = Number(data.step), loss = Number(data.loss);
  if (!isFinite(step) || !isFinite(loss)) return;
  if (st.points.length && step <= st.points[st.points.length - 1][0]) {
    // a new run, or a resume from an earlier checkpoint: keep only the points before it
    st.points = st.points.filter(([s]) => s < step);
    recomputeSmooth(st);
    st.pictures = [];
  }
  st.points.push([step, loss]);
  pushSmooth(st, step, loss);
  const n = st.points.length;
  if (n > MAX_POINTS) { // thin out the older half; the smoothed line keeps its shape
    st.points = st.points.filter((_, i) => i % 2 === 0 || i === n - 1);
    st.smooth = st.smooth.filter((_, i) => i % 2 === 0 || i === n - 1);
  }
  Object.assign(st, { step, total: Number(data.total) || st.total, loss, lr: Number(data.lr),
                      eta: data.eta_seconds == null ? null : Number(data.eta_seconds), node: data.node ?? "" });
  st.done = st.total > 0 && step >= st.total;
  st.stopped = "";
  renderPanel(st);
  redraw(node);
}

function onPictures(kind, data) {
  const found = stateFor(data);
  if (!found) return;
  const { node, st } = found;
  const refs = Array.isArray(data.images) ? data.images : [];
  const captions = (kind === "validation" ? data.prompts : data.labels) || [];
  st.pictures = refs.map((ref, i) => ({ url: viewUrl(ref), caption: String(captions[i] ?? "") }));
  st.pictureKind = kind;
  st.pictureStep = Number(data.step) || 0;
  renderPanel(st);
  redraw(node);
}

// ComfyUI's own execution events: the node starts (a new run: clear the panel), a Cancel
// (ours or the queue's) or an error ends the run.
function onExecuting(detail) {
  const id = detail && typeof detail === "object" ? detail.node ?? detail.display_node : detail;
  const node = id == null ? null : findNode(id);
  const st = node?.__unconfused;
  if (!st) return;
  Object.assign(st, newState(), { panel: st.panel, preparing: true });
  renderPanel(st);
  redraw(node);
}

function onStopped(label, data) {
  const node = findNode(data?.node_id);
  const st = node?.__unconfused;
  if (!st || !st.total || st.done) return;
  st.stopped = label;
  renderPanel(st);
  redraw(node);
}

function listen(event, handler) {
  api.addEventListener(event, (e) => {
    try {
      handler(e?.detail ?? {});
    } catch (err) {
      warnOnce(`handling ${event} failed`, err);
    }
  });
}

app.registerExtension({
  name: "unconfused.live",
  async setup() {
    if (typeof api?.addEventListener !== "function") return;
    listen("unconfused.train", onTrain);
    listen("unconfused.validation", (d) => onPictures("validation", d));
    listen("unconfused.masks", (d) => onPictures("masks", d));
    listen("executing", onExecuting);
    listen("execution_interrupted", (d) => onStopped("cancelled (resumes when queued again)", d));
    listen("execution_error", (d) => onStopped("failed", d));
  },
  nodeCreated(node) {
    try {
      const type = node?.comfyClass ?? node?.type ?? "";
      if (LIVE_TYPES.test(type)) attach(node);
    } catch (err) {
      warnOnce("adding the live panel failed", err);
    }
  },
});

export { EVENTS, statusText, formatEta };
