// FlexSR front-end extension: a read-only panel on FlexSR's nodes that tells what is true now.
//
// - "Load Upscale Model (FlexSR)": the model's description, asked from the pack's own route
//   (GET /flexsr/model_info?name=<model_name>) when the node is created, when a workflow is loaded and
//   when model_name changes; so it is there without a run, after a reload and when the node's result
//   comes from ComfyUI's cache (which sends no UI message).
// - "Upscale Image (FlexSR)" and the other FlexSR nodes: what their last run reported (the tile plan:
//   count × size, context, precision, device, batch). The text is kept in node.properties (saved with
//   the workflow, never a widget value), shown again when the workflow is reopened and when the result
//   is served from the cache.
// - Every FlexSR panel says "running…" when its node starts executing, shows the error when the node
//   fails and "cancelled" when the run is cancelled there; it is sized to its text (no blank rows after a
//   shorter report; a text that wraps onto more rows than estimated grows the panel once it is laid out).
// - The last outcome, success or failure, is kept too: a reloaded workflow shows a failure that came after a
//   success. A result served from the cache shows the last success (a failure is never cached); in a new tab
//   or browser, where the node has no kept report, the pack's route GET /flexsr/last_report?node=<id> gives
//   the server's last report of that node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const PANEL = "flexsr_panel";
export const LAST_REPORT = "flexsr_last_report";
export const LAST_OUTCOME = "flexsr_last_outcome";
export const INFO_ROUTE = "/flexsr/model_info";
export const REPORT_ROUTE = "/flexsr/last_report";
export const LOADER = "FlexSRLoadUpscaleModel";
const LINE_PX = 15;
const CHAR_PX = 6.7; // 11px monospace
const PAD_PX = 12;
const MAX_LINES = 16;
const MIN_WIDTH = 260;
const KEYS = ["flexsr_plan", "flexsr_info"];
const COLORS = { ok: "var(--input-text, #ddd)", busy: "var(--descrip-text, #999)", error: "var(--error-text, #ff6b6b)" };
const STYLE =
  "white-space: pre-wrap; overflow-wrap: anywhere; font: 11px/15px monospace; background: var(--comfy-input-bg, #222);" +
  "border-radius: 4px; padding: 6px; margin: 0; overflow: hidden; box-sizing: border-box; width: 100%; height: 100%;";

/** The text a FlexSR node reported in its UI message, or null. */
export function reportedText(message) {
  if (!message) return null;
  for (const key of KEYS) {
    const value = message[key];
    if (value === undefined || value === null) continue;
    const lines = Array.isArray(value) ? value : [value];
    const text = lines.map(String).join("\n").trim();
    if (text) return text;
  }
  return null;
}

/** Is ``node`` one of FlexSR's nodes? */
export function isFlexSR(node) {
  return String(node?.type ?? node?.comfyClass ?? "").startsWith("FlexSR");
}

function margin(widget) {
  // ComfyUI places a DOM widget's element ``margin`` px inside the box it is given, on every side
  return Number.isFinite(widget?.margin) ? widget.margin : 10;
}

/** Rows ``text`` takes in a panel ``width`` px wide (long lines wrap). */
export function rowCount(text, width) {
  const perRow = Math.max(16, Math.floor((width - PAD_PX) / CHAR_PX));
  return text.split("\n").reduce((rows, line) => rows + Math.max(1, Math.ceil(line.length / perRow)), 0);
}

function panelHeight(widget) {
  const width = (widget?.flexsrNode?.size?.[0] ?? MIN_WIDTH) - 2 * margin(widget);
  const rows = rowCount(widget?.flexsrElement?.textContent ?? "", width) + (widget?.flexsrExtraRows ?? 0);
  return Math.min(rows, MAX_LINES) * LINE_PX + PAD_PX + 2 * margin(widget);
}

/** Once laid out, a text that wraps onto more rows than estimated (other fonts, long words) grows its panel. */
function fitLaidOut(node, widget) {
  const element = widget.flexsrElement;
  if (typeof requestAnimationFrame !== "function") return;
  requestAnimationFrame(() => {
    const hidden = element.scrollHeight - element.clientHeight;
    if (!(hidden > 1) || !element.isConnected) return;
    widget.flexsrExtraRows = (widget.flexsrExtraRows ?? 0) + Math.ceil(hidden / LINE_PX);
    const wanted = node.computeSize ? node.computeSize() : node.size;
    node.setSize?.([Math.max(node.size?.[0] ?? 0, wanted[0]), wanted[1]]);
    node.setDirtyCanvas?.(true, true);
  });
}

/** Shows ``text`` in a read-only panel on ``node`` (created on first use, never serialized); ``state``:
 * "ok", "busy" or "error". The node's height follows the text, up and down. */
export function showText(node, text, state = "ok") {
  let widget = node.widgets?.find((w) => w.name === PANEL);
  if (!widget) {
    const element = document.createElement("pre");
    element.className = "flexsr-panel";
    element.setAttribute("style", STYLE);
    widget = node.addDOMWidget(PANEL, "flexsr_panel", element, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => element.textContent,
      setValue: () => {}, // read-only: nothing of it is stored in the workflow
      getMinHeight: () => panelHeight(widget),
      getMaxHeight: () => panelHeight(widget),
    });
    widget.serialize = false; // not a backend input: keep it out of widgets_values and the prompt
    widget.flexsrElement = element;
    widget.flexsrNode = node;
  }
  const element = widget.flexsrElement;
  widget.flexsrExtraRows = 0;
  element.textContent = text;
  element.title = text;
  element.dataset.state = state;
  element.style.color = COLORS[state] ?? COLORS.ok;
  widget.flexsrLines = text.split("\n").length;
  const width = Math.max(node.size?.[0] ?? 0, MIN_WIDTH);
  if (node.size) node.size[0] = width; // the height below follows the rows at this width
  const wanted = node.computeSize ? node.computeSize() : node.size;
  node.setSize?.([Math.max(width, wanted[0]), wanted[1]]);
  node.setDirtyCanvas?.(true, true);
  fitLaidOut(node, widget);
  return widget;
}

/** The panel's current text, or null when the node has none. */
export function panelText(node) {
  return node.widgets?.find((w) => w.name === PANEL)?.flexsrElement?.textContent ?? null;
}

/** Keeps a run's outcome with the node (saved in the workflow as node properties): a report is the last
 * success (what a cached result shows) and the last outcome; a failure is the last outcome only. */
export function remember(node, text, state = "ok") {
  node.properties = node.properties ?? {};
  const outcome = { text, state };
  const before = JSON.stringify([node.properties[LAST_REPORT], node.properties[LAST_OUTCOME]]);
  if (state === "ok") node.properties[LAST_REPORT] = text;
  node.properties[LAST_OUTCOME] = outcome;
  if (JSON.stringify([node.properties[LAST_REPORT], node.properties[LAST_OUTCOME]]) === before) return;
  // ComfyUI saves the open workflow (for reloads) when its change tracker sees a difference
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

function remembered(node) {
  const text = node.properties?.[LAST_REPORT];
  return typeof text === "string" && text ? text : null;
}

/** Shows the last stored report (the last success), if any. */
export function showRemembered(node) {
  const text = remembered(node);
  if (text) showText(node, text);
  return text;
}

/** Shows the last outcome, success or failure (a reopened workflow), else the last success. */
export function showLastOutcome(node) {
  const outcome = node.properties?.[LAST_OUTCOME];
  if (outcome && typeof outcome.text === "string" && outcome.text) {
    showText(node, outcome.text, outcome.state === "error" ? "error" : "ok");
    return outcome.text;
  }
  return showRemembered(node);
}

/** A new tab or browser holds no kept report: the server's last report of this node, if it has one. */
export async function fetchLastReport(node) {
  try {
    const response = await api.fetchApi(`${REPORT_ROUTE}?node=${encodeURIComponent(String(node.id))}`);
    if (!response.ok) return null;
    const body = await response.json();
    if (typeof body.report !== "string" || !body.report) return null;
    remember(node, body.report);
    showText(node, body.report);
    return body.report;
  } catch (e) {
    return null;
  }
}

function modelName(node) {
  return node.widgets?.find((w) => w.name === "model_name")?.value ?? null;
}

/** Asks the pack's route for the model's description and shows it (the newest answer wins). */
export async function refreshModelInfo(node) {
  const name = modelName(node);
  if (!name) return null;
  const ticket = (node.flexsrTicket = (node.flexsrTicket ?? 0) + 1);
  let text;
  let state = "ok";
  try {
    const response = await api.fetchApi(`${INFO_ROUTE}?name=${encodeURIComponent(name)}`);
    const body = await response.json();
    if (response.ok && body.info) {
      text = body.info;
    } else {
      text = `${name}: ${body.type ? body.type + ": " : ""}${body.error ?? response.status}`;
      state = "error";
    }
  } catch (e) {
    return null; // no route (an older pack or a stand-alone page): the panel shows run reports only
  }
  if (ticket !== node.flexsrTicket || modelName(node) !== name) return null; // a newer request is on its way
  showText(node, text, state);
  return text;
}

function nodeById(id) {
  if (id === null || id === undefined) return null;
  const graph = app.graph ?? app.canvas?.graph;
  const key = String(id).split(":").pop(); // nodes inside subgraphs are reported as "outer:inner"
  return graph?.getNodeById?.(key) ?? graph?.getNodeById?.(Number(key)) ?? null;
}

function eventNodeId(detail) {
  if (detail && typeof detail === "object") return detail.display_node ?? detail.node ?? detail.node_id ?? null;
  return detail ?? null;
}

function graphNodes() {
  const graph = app.graph ?? app.canvas?.graph;
  return graph?._nodes ?? graph?.nodes ?? [];
}

function isLoader(node) {
  return node?.type === LOADER || node?.comfyClass === LOADER;
}

/** The run is over: a panel still saying "running…" goes back to what is known. */
export function settleBusy() {
  for (const node of graphNodes()) {
    const element = node.widgets?.find((w) => w.name === PANEL)?.flexsrElement;
    if (!isFlexSR(node) || element?.dataset.state !== "busy") continue;
    if (isLoader(node)) refreshModelInfo(node);
    else if (!showRemembered(node)) showText(node, "no report yet", "busy");
  }
}

/** A FlexSR node starts running: its panel no longer describes the present. ``null``: the run ended. */
export function onExecuting(detail) {
  const id = eventNodeId(detail);
  if (id === null) return settleBusy();
  const node = nodeById(id);
  if (!isFlexSR(node)) return;
  showText(node, "running…", "busy");
}

/** Cancel: the node that was running says so. */
export function onExecutionInterrupted(detail) {
  const node = nodeById(detail?.node_id);
  if (isFlexSR(node)) showText(node, "cancelled", "error");
  settleBusy();
}

/** A node failed: its panel shows why (ComfyUI's error type and message), and the failure is kept. */
export function onExecutionError(detail) {
  const node = nodeById(detail?.node_id);
  if (!isFlexSR(node)) return;
  const type = String(detail.exception_type ?? "Error").split(".").pop();
  const text = `failed: ${type}\n${String(detail.exception_message ?? "").trim()}`;
  showText(node, text, "error");
  if (!isLoader(node)) remember(node, text, "error");
}

/** Results served from ComfyUI's cache send no UI message: show what is known instead (asking the server
 * when this page has nothing kept, as in a new tab). */
export function onExecutionCached(detail) {
  for (const id of detail?.nodes ?? []) {
    const node = nodeById(id);
    if (!isFlexSR(node)) continue;
    if (isLoader(node)) refreshModelInfo(node);
    else {
      const text = showRemembered(node);
      if (text) remember(node, text); // a cached result is a success: it is the last outcome now
      else fetchLastReport(node);
    }
  }
}

app.registerExtension({
  name: "FlexSR.NodeReports",
  async setup() {
    api.addEventListener("executing", (e) => onExecuting(e.detail));
    api.addEventListener("execution_error", (e) => onExecutionError(e.detail));
    api.addEventListener("execution_cached", (e) => onExecutionCached(e.detail));
    api.addEventListener("execution_interrupted", (e) => onExecutionInterrupted(e.detail));
    api.addEventListener("execution_success", () => settleBusy());
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FlexSR")) return;
    const isLoader = nodeData.name === LOADER;
    const proto = nodeType.prototype;

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = reportedText(message);
      if (text) {
        if (!isLoader) remember(this, text);
        showText(this, text);
      }
      return result;
    };

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (isLoader) {
        const node = this;
        const widget = node.widgets?.find((w) => w.name === "model_name");
        if (widget) {
          const callback = widget.callback;
          widget.callback = function () {
            const r = callback?.apply(this, arguments);
            refreshModelInfo(node);
            return r;
          };
        }
        queueMicrotask(() => refreshModelInfo(node)); // a new node: after its default value is set
      }
      return result;
    };

    const onConfigure = proto.onConfigure;
    proto.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      if (isLoader) refreshModelInfo(this); // a loaded workflow: its own model_name
      else showLastOutcome(this);
      return result;
    };
  },
});
