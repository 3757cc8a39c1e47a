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
export const app = {
  extensions: [],
  registerExtension(extension) { this.extensions.push(extension); },
};
"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>FlexSR web test</title></head>
<body><div id="graph"></div><pre id="result">pending</pre>
<script type="module">
import { app } from "./scripts/app.js";
const result = document.getElementById("result");
try {
  await import("./extensions/FlexSR/flexsr.js");
  class LGraphNode {  // the few LiteGraph/ComfyUI node methods the extension may use
    constructor(type) {
      this.type = type; this.widgets = []; this.size = [200, 60];
      this.el = document.createElement("div"); this.el.className = "node"; this.el.dataset.type = type;
      document.getElementById("graph").append(this.el);
    }
    addDOMWidget(name, type, element, options) {
      const widget = { name, type, element, options };
      this.widgets.push(widget); this.el.append(element); return widget;
    }
    computeSize() { return [200, 60 + 20 * this.widgets.length]; }
    setSize(size) { this.size = size; }
    setDirtyCanvas() {}
  }
  const types = {};
  for (const name of ["FlexSRLoadUpscaleModel", "FlexSRUpscaleImage", "UpscaleModelLoader"]) {
    types[name] = class extends LGraphNode { constructor() { super(name); } };
    for (const ext of app.extensions) await ext.beforeRegisterNodeDef?.(types[name], { name }, app);
  }
  const MESSAGES = __MESSAGES__;
  const loader = new types.FlexSRLoadUpscaleModel();
  const upscaler = new types.FlexSRUpscaleImage();
  const foreign = new types.UpscaleModelLoader();
  loader.onExecuted?.(MESSAGES.load);
  upscaler.onExecuted?.({ flexsr_plan: ["an earlier run"] });
  upscaler.onExecuted?.(MESSAGES.upscale);
  foreign.onExecuted?.(MESSAGES.load);
  const describe = (node) => ({
    widgets: node.widgets.map((w) => ({ name: w.name, serialize: w.serialize, option: w.options?.serialize })),
    size: node.size,
  });
  result.textContent = JSON.stringify({
    extensions: app.extensions.map((e) => e.name),
    loader: describe(loader), upscaler: describe(upscaler), foreign: describe(foreign),
  });
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


def node_messages(pack, folder: Path) -> dict:
    """What the Python nodes really send to the front end."""
    defs = pack.nodes.definitions
    torch.save(Compact(num_feat=4, num_conv=1, upscale=2).state_dict(), folder / "tiny.pth")
    load = defs.LoadUpscaleModel().load("tiny.pth")
    upscale = defs.UpscaleImage().upscale(load["result"][0], torch.rand(1, 64, 48, 3), tile_size=16, overlap=8)
    return {"load": load["ui"], "upscale": upscale["ui"]}


def serve(root: Path):
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_extension_shows_model_info_and_tile_plan(pack, chromium, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("FLEXSR_UPSCALE_MODELS", str(models))
    messages = node_messages(pack, models)
    site = tmp_path / "site"
    (site / "scripts").mkdir(parents=True)
    (site / "scripts" / "app.js").write_text(APP_STANDIN)
    shutil.copytree(ROOT / "web", site / "extensions" / "FlexSR")
    (site / "index.html").write_text(PAGE.replace("__MESSAGES__", json.dumps(messages)))
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
    state = json.loads(raw)
    assert state["extensions"] == ["FlexSR.NodeReports"]

    panels = {m.group(1): html.unescape(m.group(2)) for m in re.finditer(
        r'<div class="node" data-type="(\w+)">\s*<pre class="flexsr-panel"[^>]*>(.*?)</pre>', dom, re.S)}
    info = messages["load"]["flexsr_info"][0]
    plan = messages["upscale"]["flexsr_plan"][0]
    assert panels["FlexSRLoadUpscaleModel"] == info and "(Compact)" in info
    assert panels["FlexSRUpscaleImage"] == plan and re.search(r"\d+ tiles × \d+×\d+ px", plan) and "fp32" in plan
    assert "UpscaleModelLoader" not in panels and state["foreign"]["widgets"] == []
    # one panel per node, reused across runs, never serialized into the workflow or the prompt
    for node in ("loader", "upscaler"):
        assert state[node]["widgets"] == [{"name": "flexsr_panel", "serialize": False, "option": False}]
        assert state[node]["size"][1] > 60
