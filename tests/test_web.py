"""The web extension in real headless Chromium, against a minimal stand-in of ComfyUI's front end.

The page serves ``web/flexsr.js`` at ComfyUI's path (``/extensions/<pack>/``) next to a stand-in
``/scripts/app.js``, registers node types through the extension's ``beforeRegisterNodeDef`` as ComfyUI
does, feeds ``onExecuted`` the exact ``ui`` dicts the Python nodes return, and dumps the DOM.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from spandrel.architectures.Compact import Compact

from packutil import ROOT, pack  # noqa: F401  (session fixture)

APP_STANDIN = """
class ChangeTracker { constructor() { this.checks = 0; } checkState() { this.checks += 1; } }
export const app = {
  extensions: [],
  graph: { _nodes: [], getNodeById(id) { return this._nodes.find((n) => String(n.id) === String(id)) ?? null; } },
  extensionManager: { workflow: { activeWorkflow: { changeTracker: new ChangeTracker() } } },
  registerExtension(extension) { this.extensions.push(extension); },
};
"""

#: ComfyUI's api object: an EventTarget for the server's messages, and fetchApi for the pack's route
#: (answered here from REPLIES, the replies the pack's Python route handler really gives).
API_STANDIN = """
class Api extends EventTarget {
  constructor() { super(); this.fetched = []; }
  async fetchApi(route) {
    this.fetched.push(route);
    const url = new URL(route, "http://comfy.invalid");
    const key = url.searchParams.get("name") ?? url.searchParams.get("node");
    const reply = window.REPLIES?.[url.pathname]?.[key] ?? [404, { error: "no route" }];
    await new Promise((r) => setTimeout(r, 5));
    return new Response(JSON.stringify(reply[1]), { status: reply[0], headers: { "Content-Type": "application/json" } });
  }
  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
}
export const api = new Api();
"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>FlexSR web test</title></head>
<body><div id="graph"></div><pre id="result">pending</pre>
<script type="module">
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
const result = document.getElementById("result");
const settle = () => new Promise((r) => setTimeout(r, 60));
try {
  window.REPLIES = __REPLIES__;
  const MESSAGES = __MESSAGES__;
  await import("./extensions/FlexSR/flexsr.js");
  let nextId = 1;
  class LGraphNode {  // the few LiteGraph/ComfyUI node methods the extension uses, as ComfyUI calls them
    constructor(type, widgets) {
      this.type = type; this.id = nextId++; this.properties = {}; this.size = [200, 60];
      this.widgets = (widgets ?? []).map((w) => ({ ...w }));
      this.el = document.createElement("div"); this.el.className = "node"; this.el.dataset.type = type;
      document.getElementById("graph").append(this.el);
      app.graph._nodes.push(this);
      this.onNodeCreated?.();
    }
    addDOMWidget(name, type, element, options) {
      const widget = { name, type, element, options, margin: 10 };
      this.widgets.push(widget); this.el.append(element); return widget;
    }
    computeSize() {  // ComfyUI: every widget's height, DOM widgets from their getMinHeight
      return [200, 40 + this.widgets.reduce((h, w) => h + (w.options?.getMinHeight?.() ?? 24), 0)];
    }
    setSize(size) { this.size = size; }
    setDirtyCanvas() {}
    configure(info) {  // loading a workflow: properties and widget values, then onConfigure
      Object.assign(this.properties, info.properties ?? {});
      (info.widgets_values ?? []).forEach((v, i) => { this.widgets[i].value = v; });
      this.onConfigure?.(info);
    }
  }
  const types = {};
  const WIDGETS = { FlexSRLoadUpscaleModel: [{ name: "model_name", value: "tiny.pth" }] };
  for (const name of ["FlexSRLoadUpscaleModel", "FlexSRUpscaleImage", "FlexSRSaveUpscaleModel", "UpscaleModelLoader"]) {
    types[name] = class extends LGraphNode { constructor() { super(name, WIDGETS[name]); } };
    for (const ext of app.extensions) await ext.beforeRegisterNodeDef?.(types[name], { name }, app);
  }
  for (const ext of app.extensions) await ext.setup?.(app);
  const panel = (node) => {
    const w = node.widgets.find((w) => w.name === "flexsr_panel");
    return w ? { text: w.element.textContent, state: w.element.dataset.state, lines: w.flexsrLines,
                 height: node.size[1], serialize: w.serialize, option: w.options.serialize } : null;
  };
  const steps = {};
  const tracker = app.extensionManager.workflow.activeWorkflow.changeTracker;

  // a new loader: its model's info comes from the route, no run needed
  const loader = new types.FlexSRLoadUpscaleModel();
  await settle();
  steps.loaderNew = panel(loader);
  // model_name changed in the UI: a file that does not load
  const modelName = loader.widgets.find((w) => w.name === "model_name");
  modelName.value = "broken.pth"; modelName.callback?.("broken.pth");
  await settle();
  steps.loaderBroken = panel(loader);
  modelName.value = "tiny.pth"; modelName.callback?.("tiny.pth");
  await settle();
  steps.loaderBack = panel(loader);

  // the upscale node runs: the plan shows and is kept with the node
  const upscaler = new types.FlexSRUpscaleImage();
  api.emit("executing", String(upscaler.id));
  steps.upscalerRunning = panel(upscaler);
  upscaler.onExecuted?.(MESSAGES.upscale);
  steps.upscalerDone = panel(upscaler);
  steps.kept = upscaler.properties.flexsr_last_report;
  steps.checks = tracker.checks;
  // it runs again and fails: the panel says so
  api.emit("executing", String(upscaler.id));
  api.emit("execution_error", { node_id: String(upscaler.id), node_type: "FlexSRUpscaleImage",
    exception_type: "BadImageError", exception_message: "The image has 2 channels." });
  steps.upscalerFailed = panel(upscaler);
  // the next run is served from the cache: no UI message, the kept plan comes back; the loader asks again
  const fetchedBefore = api.fetched.length;
  api.emit("execution_cached", { nodes: [String(loader.id), String(upscaler.id)], prompt_id: "p" });
  await settle();
  steps.upscalerCached = panel(upscaler);
  steps.loaderCached = panel(loader);
  steps.refetched = api.fetched.length - fetchedBefore;

  // a cancelled run: the running node says so, and a panel left "running…" goes back to what is known
  api.emit("executing", String(upscaler.id));
  api.emit("executing", String(loader.id));
  api.emit("execution_interrupted", { node_id: String(upscaler.id), node_type: "FlexSRUpscaleImage", executed: [] });
  await settle();
  steps.upscalerCancelled = panel(upscaler);
  steps.loaderAfterCancel = panel(loader);
  api.emit("executing", String(upscaler.id));
  api.emit("executing", null);  // the run ended (the node never reported): back to the kept plan
  steps.upscalerSettled = panel(upscaler);

  // the page is reloaded: new nodes configured from the saved workflow, no run
  const reopenedLoader = new types.FlexSRLoadUpscaleModel();
  reopenedLoader.configure({ widgets_values: ["tiny.pth"], properties: {} });
  const reopened = new types.FlexSRUpscaleImage();
  reopened.configure({ properties: { flexsr_last_report: steps.kept } });
  await settle();
  steps.reopened = panel(reopened);
  steps.reopenedLoader = panel(reopenedLoader);

  // a shorter report after a longer one: the panel (and the node) shrink to it
  const saver = new types.FlexSRSaveUpscaleModel();
  saver.onExecuted?.({ flexsr_info: ["line 1\\nline 2\\nline 3\\nline 4\\nline 5"] });
  steps.saverLong = panel(saver);
  saver.onExecuted?.(MESSAGES.save);
  steps.saverShort = panel(saver);
  api.emit("execution_error", { node_id: String(saver.id), exception_type: "ModelExistsError",
    exception_message: "'/a/long/path/".repeat(12) + "x.safetensors' already exists; choose another name." });
  steps.saverWrapped = panel(saver);
  // a save, then a failing save, then a reload: the reopened node shows the failure, not the old success
  const saverProps = JSON.parse(JSON.stringify(saver.properties));
  const reopenedSaver = new types.FlexSRSaveUpscaleModel();
  reopenedSaver.configure({ properties: saverProps });
  steps.reopenedAfterFailure = panel(reopenedSaver);
  // a new tab opens the workflow and runs it; every result comes from the cache and this page kept nothing:
  // the upscale node asks the server for its last report
  const fresh = new types.FlexSRUpscaleImage();
  fresh.id = 77;
  api.emit("execution_cached", { nodes: ["77"], prompt_id: "q" });
  await settle();
  steps.freshTabCached = panel(fresh);
  steps.freshTabKept = fresh.properties.flexsr_last_report ?? null;
  // a failure of a node that is not the pack's changes nothing of the pack's panels
  const foreign = new types.UpscaleModelLoader();
  foreign.onExecuted?.(MESSAGES.load);
  api.emit("executing", String(foreign.id));
  api.emit("execution_error", { node_id: String(foreign.id), exception_type: "X", exception_message: "y" });
  steps.foreign = foreign.widgets.map((w) => w.name);
  steps.extensions = app.extensions.map((e) => e.name);
  result.textContent = JSON.stringify(steps);
} catch (e) {
  result.textContent = "ERROR " + e + "\\n" + (e.stack || "");
}
</script></body></html>
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is required in CI (.ci/run installs it); it is missing")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def node_messages(pack, folder: Path) -> tuple[dict, dict]:
    """What the Python nodes and the pack's route really send to the front end."""
    defs, host, model_io = pack.nodes.definitions, pack.nodes.host, pack.nodes.model_io
    torch.save(Compact(num_feat=4, num_conv=1, upscale=2).state_dict(), folder / "tiny.pth")
    (folder / "broken.pth").write_bytes(b"not a checkpoint")
    load = defs.LoadUpscaleModel().load("tiny.pth")
    upscale = defs.UpscaleImage().upscale(load["result"][0], torch.rand(1, 64, 48, 3), tile_size=16, overlap=8)
    save = defs.SaveUpscaleModel().save(load["result"][0], "tiny_copy")
    # the same node run in another tab: the server keeps its report by the node's id (ComfyUI's UNIQUE_ID)
    defs.UpscaleImage().upscale(load["result"][0], torch.rand(1, 64, 48, 3), tile_size=16, overlap=8, unique_id="77")
    replies = {host.MODEL_INFO_ROUTE: {name: host.model_info_reply(name, model_io.describe_file)
                                       for name in ("tiny.pth", "broken.pth")},
               host.REPORT_ROUTE: {"77": host.last_report_reply("77")}}
    return {"load": load["ui"], "upscale": upscale["ui"], "save": save["ui"]}, replies


def serve(root: Path):
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_panels_tell_the_truth(pack, chromium, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("FLEXSR_UPSCALE_MODELS", str(models))
    messages, replies = node_messages(pack, models)
    site = tmp_path / "site"
    (site / "scripts").mkdir(parents=True)
    (site / "scripts" / "app.js").write_text(APP_STANDIN)
    (site / "scripts" / "api.js").write_text(API_STANDIN)
    shutil.copytree(ROOT / "web", site / "extensions" / "FlexSR")
    page = PAGE.replace("__MESSAGES__", json.dumps(messages)).replace("__REPLIES__", json.dumps(replies))
    (site / "index.html").write_text(page)
    server = serve(site)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
               "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    dom = proc.stdout
    assert "<pre id=\"result\">" in dom, proc.stderr[-2000:]
    raw = html.unescape(re.search(r'<pre id="result">(.*?)</pre>', dom, re.S).group(1))
    assert not raw.startswith("ERROR") and raw != "pending", raw
    steps = json.loads(raw)
    assert steps["extensions"] == ["FlexSR.NodeReports"]

    info = messages["load"]["flexsr_info"][0]
    plan = messages["upscale"]["flexsr_plan"][0]
    assert tuple(replies["/flexsr/model_info"]["tiny.pth"]) == (200, {"name": "tiny.pth", "info": info})
    assert "Compact" in info and re.search(r"\d+ tiles × \d+×\d+ px", plan) and "fp32" in plan
    # the loader: the route's description at once, the load error for a broken file, and back
    assert steps["loaderNew"]["text"] == info and steps["loaderNew"]["state"] == "ok"
    broken = steps["loaderBroken"]
    assert broken["state"] == "error" and broken["text"].startswith("broken.pth: ") and "Error" in broken["text"]
    assert steps["loaderBack"]["text"] == info
    # the upscale node: running, then its plan (kept in the node's properties, the workflow told)
    assert steps["upscalerRunning"] == {**steps["upscalerRunning"], "text": "running…", "state": "busy"}
    assert steps["upscalerDone"]["text"] == plan and steps["kept"] == plan and steps["checks"] >= 1
    failed = steps["upscalerFailed"]
    assert failed["state"] == "error" and failed["text"] == "failed: BadImageError\nThe image has 2 channels."
    # results from the cache and a reopened workflow show what is known
    assert steps["upscalerCached"]["text"] == plan and steps["upscalerCached"]["state"] == "ok"
    assert steps["loaderCached"]["text"] == info and steps["refetched"] == 1
    assert steps["reopened"]["text"] == plan and steps["reopenedLoader"]["text"] == info
    assert steps["upscalerCancelled"]["text"] == "cancelled" and steps["upscalerCancelled"]["state"] == "error"
    assert steps["loaderAfterCancel"]["text"] == info and steps["upscalerSettled"]["text"] == plan
    # panels size to their text: a shorter report shrinks the panel and the node
    long, short = steps["saverLong"], steps["saverShort"]
    assert long["lines"] == 5 and short["lines"] == 1 and short["text"] == "saved tiny_copy.safetensors"
    assert short["height"] < long["height"]
    # a long message wraps: its panel grows with the rows it takes, not with its line count
    wrapped = steps["saverWrapped"]
    assert wrapped["lines"] == 2 and wrapped["state"] == "error" and wrapped["height"] > long["height"]
    # never serialized; nodes that are not the pack's get nothing
    for key in ("loaderNew", "upscalerDone", "saverShort"):
        assert steps[key]["serialize"] is False and steps[key]["option"] is False
    assert steps["foreign"] == []
    # the last outcome survives a reload, a failure included
    reopened_fail = steps["reopenedAfterFailure"]
    assert reopened_fail["state"] == "error" and reopened_fail["text"].startswith("failed: ModelExistsError")
    # a new tab with nothing kept: the server's last report of the node comes back, and is kept
    assert tuple(replies["/flexsr/last_report"]["77"])[0] == 200
    assert steps["freshTabCached"]["text"] == replies["/flexsr/last_report"]["77"][1]["report"]
    assert steps["freshTabKept"] == steps["freshTabCached"]["text"] and "tiles" in steps["freshTabKept"]
