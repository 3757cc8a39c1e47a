// FlexSR front-end extension: after a run, shows what the backend reported on the node itself —
// the loaded model's description on "Load Upscale Model (FlexSR)" and the tile plan (count × size,
// precision, device) on "Upscale Image (FlexSR)". The nodes return {"ui": {"flexsr_info" | "flexsr_plan":
// [text]}} and ComfyUI hands that to onExecuted.
import { app } from "../../scripts/app.js";

const PANEL = "flexsr_panel";
const LINE_PX = 16;
const MAX_PX = 220;
const KEYS = ["flexsr_plan", "flexsr_info"];
const STYLE =
  "white-space: pre-wrap; font: 11px/1.35 monospace; color: var(--input-text, #ddd);" +
  "background: var(--comfy-input-bg, #222); border-radius: 4px; padding: 4px 6px; margin: 0;" +
  "overflow: auto; box-sizing: border-box; width: 100%; height: 100%;";

/** The text a FlexSR node reported, or null. */
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

/** Shows ``text`` in a read-only panel widget on ``node`` (created on first use, never serialized). */
export function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === PANEL);
  if (!widget) {
    const element = document.createElement("pre");
    element.className = "flexsr-panel";
    element.setAttribute("style", STYLE);
    widget = node.addDOMWidget(PANEL, "flexsr_panel", element, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => element.textContent,
      setValue: (v) => {
        element.textContent = v ?? "";
      },
      // room for every line (ComfyUI sizes DOM widgets from these)
      getMinHeight: () => Math.min(LINE_PX * (widget?.flexsrLines ?? 1) + 18, MAX_PX),
      getMaxHeight: () => MAX_PX,
    });
    widget.serialize = false; // not a backend input: keep it out of widgets_values and the prompt
    widget.flexsrElement = element;
  }
  widget.flexsrElement.textContent = text;
  widget.flexsrElement.title = text;
  widget.flexsrLines = text.split("\n").length;
  const wanted = node.computeSize ? node.computeSize() : node.size;
  node.setSize?.([Math.max(node.size?.[0] ?? 0, wanted[0], 260), Math.max(wanted[1], node.size?.[1] ?? 0)]);
  node.setDirtyCanvas?.(true, true);
  return widget;
}

app.registerExtension({
  name: "FlexSR.NodeReports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FlexSR")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = reportedText(message);
      if (text) showText(this, text);
      return result;
    };
  },
});
