"""The pack the way users meet it: a headless ComfyUI with the pack, driven through headless Chromium.

    python bench/comfy_frontend_check.py --comfyui /path/to/ComfyUI [--python /path/to/python] [--out DIR]

Needs a ComfyUI checkout whose requirements are installed for ``--python`` (default: this interpreter),
``playwright`` importable here (``pip install playwright``; no browser download: it drives the system's
Chromium through ``--chromium``, default the first of chromium / chromium-browser / google-chrome on
PATH). CI cannot fetch ComfyUI, so this script is run by hand; it prints what it saw and exits non-zero
when a check fails.

What it does, on 127.0.0.1 only:
1. Links the pack into ``<ComfyUI>/custom_nodes/`` (removed again at the end) and starts
   ``main.py --cpu`` with one torch thread; waits for the server.
2. For each of the pack's templates (fetched the way the template browser fetches them): loads it,
   runs it, checks the FlexSR panels; reloads the page, checks the panels again, runs it again (the
   results now come from ComfyUI's cache), checks the panels once more. Screenshots of each step.
3. Runs ``fuse_and_save_model`` once more: the save fails ("already exists") and the Save node's panel
   must show that failure, not the earlier success.
   After a page reload the Save node's panel must still show that failure (the last outcome is kept,
   failure included). Saving under a shipped model's name (``FlexSR_anime_x2``) must fail with a message
   that says the name belongs to the pack's own model.
4. A fresh browser context (a new tab in another browser profile: nothing kept in the page) opens
   ``upscale_image`` and runs it; every node comes from ComfyUI's cache, and the Upscale node's panel must
   still show its report (asked from the server's ``/flexsr/last_report``).
5. A one-tile run (``upscale_image`` with its ``overlap`` changed, so the node runs again; automatic tiles): the progress fractions
   the node sends must rise and reach at least 90% before the node ends.
6. Runs ``upscale_image`` at ``target_scale`` 4 (two model passes, many seconds on a CPU), records the
   node's progress messages (largest gap between two), then presses Cancel and measures how long the
   run takes to stop.
7. Opens the template browser on the pack's templates and checks that each thumbnail loads.
8. At a 1280×720 window (a laptop's browser), loads each template and checks that every node, title
   included, lies where the canvas shows (not under the menu bar, the tabs, the side bar, the minimap, the
   canvas buttons or past the window's edge).
Screenshots and a JSON summary go to ``--out`` (default ``./frontend_check``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from comfy_server import PACK, check_comfyui, comfyui_server, pack_in_custom_nodes, wait_http  # noqa: E402

TEMPLATES = sorted(p.stem for p in (PACK / "example_workflows").glob("*.json"))
PANEL_JS = """() => {
  const out = {};
  for (const node of window.app.graph._nodes) {
    const w = (node.widgets || []).find((w) => w.name === "flexsr_panel");
    if (w) out[node.type] = { text: w.flexsrElement.textContent, state: w.flexsrElement.dataset.state,
                              height: node.size[1], lines: w.flexsrLines };
  }
  return out;
}"""
EVENTS_JS = """() => {
  const api = window.comfyAPI.api.api;
  window.flexsrEvents = [];
  for (const type of ["executing", "progress", "execution_cached", "execution_error", "execution_success",
                      "execution_interrupted", "executed"]) {
    api.addEventListener(type, (e) => window.flexsrEvents.push({ type, t: performance.now(), detail: e.detail }));
  }
}"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Check:
    def __init__(self):
        self.failures: list[str] = []
        self.facts: dict = {}

    def __call__(self, ok: bool, what: str) -> bool:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            self.failures.append(what)
        return ok


FIT_VIEWPORT = {"width": 1280, "height": 720}
FIT_STEP = 4  # px between the probed points of the window


def visible_canvas(page) -> list[list[bool]]:
    """Which points of the window show the graph: the canvas itself or a node's DOM widget (text panels,
    image previews) on it; not the menu bar, the tabs, the side bar, the minimap or the canvas buttons."""
    return page.evaluate("""(step) => {
        const canvas = window.app.canvas.canvas;
        const rows = [];
        for (let y = 0; y < window.innerHeight; y += step) {
          const row = [];
          for (let x = 0; x < window.innerWidth; x += step) {
            const el = document.elementFromPoint(x, y);
            row.push(el === canvas || !!(el && el.closest(".dom-widget")));
          }
          rows.push(row);
        }
        return rows;
    }""", FIT_STEP)


def node_boxes(page) -> list[dict]:
    """Each node's box on screen (window px, title bar included)."""
    return page.evaluate("""() => {
        const c = window.app.canvas, ds = c.ds, r = c.canvas.getBoundingClientRect();
        const title = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
        return window.app.graph._nodes.map((n) => {
          const x0 = (n.pos[0] + ds.offset[0]) * ds.scale + r.left;
          const y0 = (n.pos[1] - title + ds.offset[1]) * ds.scale + r.top;
          return {type: n.type, x0, y0, x1: x0 + n.size[0] * ds.scale, y1: y0 + (n.size[1] + title) * ds.scale};
        });
    }""")


def hidden_part(box: dict, shown: list[list[bool]]) -> float:
    """Share of ``box``'s probed points that the canvas does not show."""
    total = hidden = 0
    for j, row in enumerate(shown):
        y = j * FIT_STEP
        if not box["y0"] <= y <= box["y1"]:
            continue
        for i, seen in enumerate(row):
            if box["x0"] <= i * FIT_STEP <= box["x1"]:
                total += 1
                hidden += not seen
    ys, xs = len(shown) * FIT_STEP, len(shown[0]) * FIT_STEP if shown else 0
    if box["x0"] < 0 or box["y0"] < 0 or box["x1"] > xs or box["y1"] > ys:  # beyond the window: hidden too
        area = (box["x1"] - box["x0"]) * (box["y1"] - box["y0"])
        inside = max(0.0, min(box["x1"], xs) - max(box["x0"], 0)) * max(0.0, min(box["y1"], ys) - max(box["y0"], 0))
        return 1 - (inside / area) * (1 - hidden / max(total, 1))
    return hidden / max(total, 1)


def check_fit(check, browser, base: str, out: Path, pack_key: str) -> None:
    context = browser.new_context(viewport=FIT_VIEWPORT)
    small = Session(context.new_page(), base, out)
    small.pack_key = pack_key
    small.open()
    fits = {}
    for name in TEMPLATES:
        small.load_template(name)
        small.page.wait_for_timeout(500)
        shown = visible_canvas(small.page)
        boxes = node_boxes(small.page)
        off = {b["type"]: round(hidden_part(b, shown), 3) for b in boxes if hidden_part(b, shown) > 0.0}
        fits[name] = off
        small.shot(f"{name}_1280x720")
        check(not off, f"{name} at 1280×720: every node in view" + (f" (hidden parts: {off})" if off else ""))
    check.facts["fit_1280x720"] = fits
    context.close()



class Session:
    """One browser page on the ComfyUI front end."""

    def __init__(self, page, base: str, out: Path):
        self.page, self.base, self.out = page, base, out
        self.shots: list[str] = []

    def open(self) -> None:
        self.page.goto(self.base + "/", wait_until="domcontentloaded")
        self.page.wait_for_function("() => window.app && window.app.graph && window.comfyAPI && window.comfyAPI.api",
                                    timeout=120_000)
        self.page.wait_for_timeout(2500)  # extensions' setup, the restored workflow
        self.page.evaluate(EVENTS_JS)

    def reload(self) -> None:
        self.page.reload(wait_until="domcontentloaded")
        self.page.wait_for_function("() => window.app && window.app.graph && window.comfyAPI && window.comfyAPI.api",
                                    timeout=120_000)
        self.page.wait_for_timeout(2500)
        self.page.evaluate(EVENTS_JS)

    def load_template(self, name: str) -> dict:
        workflow = self.page.evaluate(
            """async ([folder, name]) => {
                 const r = await fetch(`/api/workflow_templates/${encodeURIComponent(folder)}/${name}.json`);
                 const w = await r.json();
                 await window.app.loadGraphData(w, true, true, name);
                 return w;
               }""", [self.pack_key, name])
        self.page.wait_for_timeout(1500)
        return workflow

    def queue(self, timeout: float = 300) -> dict:
        """Queue the current graph; wait for success, error or interruption; return the events."""
        self.page.evaluate("() => { window.flexsrEvents = []; }")
        self.page.evaluate("() => window.app.queuePrompt(0, 1)")
        self.page.wait_for_function(
            "() => window.flexsrEvents.some((e) => ['execution_success', 'execution_error', "
            "'execution_interrupted'].includes(e.type))", timeout=timeout * 1000)
        self.page.wait_for_timeout(800)
        return self.page.evaluate("() => window.flexsrEvents")

    def panels(self) -> dict:
        return self.page.evaluate(PANEL_JS)

    def shot(self, name: str) -> None:
        path = self.out / f"{len(self.shots):02d}_{name}.png"
        self.page.screenshot(path=str(path))
        self.shots.append(path.name)


def outcome(events: list) -> str:
    for e in events:
        if e["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            return e["type"]
    return "none"


def check_panels(check: Check, panels: dict, template: str, when: str) -> None:
    loader = panels.get("FlexSRLoadUpscaleModel", {})
    check(loader.get("state") == "ok" and "architecture:" in loader.get("text", ""),
          f"{template} {when}: the loader shows the model's info ({loader.get('text', '')[:40]!r}…)")
    if template.startswith("upscale"):
        plan = panels.get("FlexSRUpscaleImage", {})
        check(plan.get("state") == "ok" and " tile" in plan.get("text", ""),
              f"{template} {when}: the upscale node shows its plan ({plan.get('text', '').splitlines()[:1]})")
    for kind, panel in panels.items():
        text = panel.get("text", "")
        check("running…" not in text, f"{template} {when}: {kind}'s panel is not stuck at 'running…'")


def check_rgba_output(check: Check, base: str, events: list) -> None:
    """The RGBA template's saved image really has alpha (fetched the way the front end shows it)."""
    import io

    from PIL import Image

    prompt_id = next(e["detail"]["prompt_id"] for e in events if e["type"] == "execution_success")
    history = json.loads(urllib.request.urlopen(f"{base}/history/{prompt_id}").read())[prompt_id]
    images = [img for out in history["outputs"].values() for img in out.get("images", [])]
    img = images[0]
    query = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
    with Image.open(io.BytesIO(urllib.request.urlopen(f"{base}/view?{query}").read())) as im:
        lo, hi = im.getchannel("A").getextrema() if im.mode == "RGBA" else (255, 255)
        check.facts["rgba_output"] = {"file": img["filename"], "mode": im.mode, "size": im.size, "alpha": [lo, hi]}
        check(im.mode == "RGBA" and lo < 16 and hi > 240,
              f"the RGBA template saves {im.mode} {im.size[0]}×{im.size[1]}, alpha {lo}…{hi}")


def run(args) -> int:
    from playwright.sync_api import sync_playwright

    comfy = check_comfyui(Path(args.comfyui))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved_model = comfy / "models" / "upscale_models" / "flexsr_fused.safetensors"
    had_saved = saved_model.exists()
    check = Check()
    base = f"http://127.0.0.1:{args.port}"
    try:
        with pack_in_custom_nodes(comfy, "FlexSR-frontend-check") as link, \
                comfyui_server(comfy, args.python, args.port, out / "comfyui.log",
                               folders={"output": out / "output"}) as server:
            wait_http(base + "/system_stats", 240, server)
            templates = json.loads(urllib.request.urlopen(base + "/api/workflow_templates").read())
            names = next((v for k, v in templates.items() if Path(k).name.startswith("FlexSR") or k == link.name
                          or PACK.name in k), None)
            pack_key = next((k for k, v in templates.items() if v is names), None)
            check(sorted(names or []) == TEMPLATES, f"ComfyUI lists the templates {sorted(names or [])}")
            info = json.loads(urllib.request.urlopen(
                base + "/flexsr/model_info?name=FlexSR_default_x2.safetensors").read())
            check("architecture:" in info.get("info", ""), "GET /flexsr/model_info answers")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                page = browser.new_page(viewport={"width": 1600, "height": 900})
                console: list[str] = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error",) else None)
                responses: list[tuple[str, int]] = []
                page.on("response", lambda r: responses.append((r.url, r.status)))
                s = Session(page, base, out)
                s.pack_key = pack_key or "FlexSR"  # the pack's folder name under custom_nodes
                s.open()
                for name in TEMPLATES:
                    if name == "fuse_and_save_model" and saved_model.exists():
                        saved_model.unlink()
                    s.load_template(name)
                    s.shot(f"{name}_loaded")
                    first = s.panels()
                    check("FlexSRLoadUpscaleModel" in first and "architecture:" in first["FlexSRLoadUpscaleModel"]["text"],
                          f"{name} loaded: the loader shows the model's info before any run")
                    events = s.queue()
                    check(outcome(events) == "execution_success", f"{name}: the run succeeds ({outcome(events)})")
                    s.shot(f"{name}_ran")
                    if name == "upscale_rgba_with_mask":
                        check_rgba_output(check, base, events)
                    check_panels(check, s.panels(), name, "after the run")
                    s.reload()
                    s.shot(f"{name}_reloaded")
                    check_panels(check, s.panels(), name, "after a page reload")
                    events = s.queue()
                    cached = [str(i) for e in events if e["type"] == "execution_cached" for i in e["detail"]["nodes"]]
                    check(outcome(events) == "execution_success" and len(cached) >= 2,
                          f"{name}: the second run is served from the cache (cached nodes {cached})")
                    s.shot(f"{name}_cached")
                    check_panels(check, s.panels(), name, "after a cached run")
                    check.facts.setdefault("panels", {})[name] = s.panels()

                # a failed save: the panel shows the failure, not the earlier success
                s.load_template("fuse_and_save_model")
                events = s.queue()
                errors = [e["detail"] for e in events if e["type"] == "execution_error"]
                save_panel = s.panels().get("FlexSRSaveUpscaleModel", {})
                s.shot("save_failed_dialog")
                page.keyboard.press("Escape")  # ComfyUI's error dialog
                page.wait_for_timeout(500)
                check(bool(errors) and "ModelExistsError" in errors[0].get("exception_type", "")
                      and "/" not in errors[0].get("exception_type", ""),
                      f"the repeated save fails with a plain error type ({errors[0].get('exception_type') if errors else None})")
                check(save_panel.get("state") == "error" and "already exists" in save_panel.get("text", ""),
                      f"the Save node's panel shows the failure ({save_panel.get('text', '')[:60]!r})")
                s.shot("save_failed")
                s.reload()
                reloaded = s.panels().get("FlexSRSaveUpscaleModel", {})
                check(reloaded.get("state") == "error" and "already exists" in reloaded.get("text", ""),
                      f"after a reload the Save node's panel still shows the failure ({reloaded.get('text', '')[:60]!r})")
                s.shot("save_failed_reloaded")

                # saving under a shipped model's name is refused: it would hide that model from every loader
                s.load_template("fuse_and_save_model")
                page.evaluate("""() => {
                    const node = window.app.graph._nodes.find((n) => n.type === "FlexSRSaveUpscaleModel");
                    node.widgets.find((w) => w.name === "filename").value = "FlexSR_anime_x2";
                }""")
                events = s.queue()
                errors = [e["detail"] for e in events if e["type"] == "execution_error"]
                page.keyboard.press("Escape")
                page.wait_for_timeout(500)
                shadow = s.panels().get("FlexSRSaveUpscaleModel", {})
                check(bool(errors) and "comes with FlexSR" in errors[0].get("exception_message", "")
                      and shadow.get("state") == "error",
                      f"saving as FlexSR_anime_x2 is refused ({(errors[0].get('exception_message', '') if errors else '')[:70]!r})")
                check.facts["save_shadowing"] = errors[0].get("exception_message", "") if errors else None
                s.shot("save_shadowing")

                # a fresh tab in another browser profile: the cached run's panel comes from the server
                s.load_template("upscale_image")
                s.queue()  # make sure the server holds this graph's outputs and report
                context = browser.new_context(viewport={"width": 1600, "height": 900})
                fresh = Session(context.new_page(), base, out)
                fresh.pack_key = s.pack_key
                fresh.open()
                fresh.load_template("upscale_image")
                events = fresh.queue()
                fresh.page.wait_for_timeout(1500)  # the panel asks the server for the report
                cached = [str(i) for e in events if e["type"] == "execution_cached" for i in e["detail"]["nodes"]]
                report = fresh.panels().get("FlexSRUpscaleImage", {})
                check(outcome(events) == "execution_success" and len(cached) >= 2 and report.get("state") != "busy"
                      and len(report.get("text", "")) > 20,
                      f"a fresh tab's cached run shows the upscale report ({report.get('text', '')[:60]!r}, cached {cached})")
                fresh.shot("fresh_tab_cached")
                context.close()

                # a one-tile run: the progress fractions rise to ~100%
                s.load_template("upscale_image")
                page.evaluate("""() => {
                    const node = window.app.graph._nodes.find((n) => n.type === "FlexSRUpscaleImage");
                    const w = node.widgets.find((w) => w.name === "overlap");
                    w.value = w.value + 8;  // a changed input: the node runs again
                }""")
                events = s.queue()
                upscaler_id = page.evaluate("() => String(window.app.graph._nodes.find((n) => n.type === 'FlexSRUpscaleImage').id)")
                fractions = [e["detail"]["value"] / max(1, e["detail"]["max"]) for e in events
                             if e["type"] == "progress" and str(e["detail"].get("node")) == upscaler_id]
                check.facts["one_tile_progress"] = [round(f, 3) for f in fractions]
                check(outcome(events) == "execution_success" and len(fractions) >= 2
                      and all(b >= a for a, b in zip(fractions, fractions[1:])) and max(fractions or [0]) >= 0.9,
                      f"one-tile run: {len(fractions)} progress messages, rising, last {fractions[-1] if fractions else None}")

                # progress cadence and cancel latency on a long run
                s.load_template("upscale_image")
                page.evaluate("""(model) => {
                    const node = window.app.graph._nodes.find((n) => n.type === "FlexSRUpscaleImage");
                    node.widgets.find((w) => w.name === "target_scale").value = 4.0;
                    if (model) {
                      const loader = window.app.graph._nodes.find((n) => n.type === "FlexSRLoadUpscaleModel");
                      const w = loader.widgets.find((w) => w.name === "model_name");
                      w.value = model;
                      w.callback?.(model);
                    }
                }""", args.long_model)
                check.facts["long_run_model"] = args.long_model or "the template's"
                page.evaluate("() => { window.flexsrEvents = []; }")
                page.evaluate("() => window.app.queuePrompt(0, 1)")
                page.wait_for_function("""() => window.flexsrEvents.some((e) => e.type === 'executing' &&
                    String(e.detail) === String(window.app.graph._nodes.find((n) => n.type === 'FlexSRUpscaleImage').id))""",
                                       timeout=300_000)
                page.wait_for_timeout(args.run_seconds * 1000)
                s.shot("upscale_running")
                running = s.panels().get("FlexSRUpscaleImage", {})
                check(running.get("state") == "busy", "the upscale node's panel says 'running…' while it runs")
                pressed = page.evaluate("async () => { const t = performance.now(); "
                                        "await window.comfyAPI.api.api.interrupt(null); return t; }")
                page.wait_for_function("() => window.flexsrEvents.some((e) => ['execution_interrupted', "
                                       "'execution_success', 'execution_error'].includes(e.type))", timeout=120_000)
                events = page.evaluate("() => window.flexsrEvents")
                stop = next(e for e in events if e["type"] in ("execution_interrupted", "execution_success", "execution_error"))
                upscaler_id = page.evaluate("() => String(window.app.graph._nodes.find((n) => n.type === 'FlexSRUpscaleImage').id)")
                start = next(e["t"] for e in events if e["type"] == "executing" and str(e["detail"]) == upscaler_id)
                ticks = [start] + [e["t"] for e in events if e["type"] == "progress"
                                   and str(e["detail"].get("node")) == upscaler_id and e["t"] < pressed]
                gaps = [(b - a) / 1000 for a, b in zip(ticks, ticks[1:])]
                latency = (stop["t"] - pressed) / 1000
                check.facts.update(progress_messages=len(ticks) - 1, largest_progress_gap_s=round(max(gaps or [0]), 2),
                                   first_progress_after_s=round(gaps[0], 2) if gaps else None,
                                   largest_gap_after_the_first_s=round(max(gaps[1:] or [0]), 2),
                                   ran_before_cancel_s=round((pressed - start) / 1000, 1),
                                   cancel_latency_s=round(latency, 2), stopped_by=stop["type"])
                check(len(ticks) > 3 and max(gaps) <= 1.0,
                      f"progress: {len(ticks) - 1} messages in {(pressed - start) / 1000:.1f} s, largest gap {max(gaps or [0]):.2f} s")
                check(stop["type"] == "execution_interrupted" and latency <= 2.0, f"cancel took {latency:.2f} s ({stop['type']})")
                page.wait_for_timeout(800)
                s.shot("upscale_cancelled")
                cancelled = s.panels().get("FlexSRUpscaleImage", {})
                check(cancelled.get("text") == "cancelled", f"after Cancel the upscale node's panel says {cancelled.get('text')!r}")

                # the templates in a laptop's window
                check_fit(check, browser, base, out, s.pack_key)

                # the template browser
                page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
                page.wait_for_timeout(2500)
                dialog = page.locator("[role=dialog]").last
                for label in dict.fromkeys([pack_key or "FlexSR", "FlexSR", link.name]):
                    try:  # the pack's entry in the browser's side bar
                        dialog.get_by_text(label, exact=True).first.click(timeout=5000)
                        break
                    except Exception:
                        continue
                page.wait_for_timeout(2500)
                s.shot("template_browser")
                # the browser fetches each thumbnail, then shows it from a blob: URL
                thumbs = {n: [status for url, status in responses if "/workflow_templates/" in url and url.endswith(f"/{n}.jpg")]
                          for n in TEMPLATES}
                shown = page.evaluate("() => [...document.querySelectorAll('img')].filter((i) => i.complete && "
                                      "i.naturalWidth > 0).length")
                check.facts["thumbnails"] = {"fetched": thumbs, "images_shown": shown,
                                             "requests": sorted({u for u, _ in responses if "template" in u})}
                ok = [n for n, statuses in thumbs.items() if 200 in statuses]
                check(len(ok) == len(TEMPLATES) and shown >= len(TEMPLATES),
                      f"the template browser fetched {len(ok)} of {len(TEMPLATES)} thumbnails, {shown} images shown")
                check.facts["http_errors"] = sorted({f"{status} {url}" for url, status in responses if status >= 400})
                flexsr_console = [c for c in console if "flexsr" in c.lower()]
                check.facts["console_errors"] = console
                check(not flexsr_console, f"no console errors from the pack ({len(console)} console errors in all)")
                browser.close()
    finally:
        if saved_model.exists() and not had_saved:
            saved_model.unlink()
    check.facts["failures"] = check.failures
    check.facts["screenshots"] = s.shots if "s" in locals() else []
    (out / "summary.json").write_text(json.dumps(check.facts, indent=2, ensure_ascii=False))
    print(json.dumps({k: v for k, v in check.facts.items() if k not in ("panels", "thumbnails")}, indent=2,
                     ensure_ascii=False))
    print(f"{len(check.failures)} failed; screenshots in {out}")
    return 1 if check.failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout (with its requirements installed)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs ComfyUI")
    ap.add_argument("--chromium", default=find_chromium(), help="a Chromium/Chrome executable")
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--out", default="frontend_check", help="folder for screenshots and summary.json")
    ap.add_argument("--run-seconds", type=int, default=6, help="how long the long run goes before Cancel")
    ap.add_argument("--long-model", default=None,
                    help="model_name for the progress/cancel run (e.g. a heavier model in upscale_models)")
    args = ap.parse_args(argv)
    if not args.chromium:
        ap.error("no Chromium found; pass --chromium")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
