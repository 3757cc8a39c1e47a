"""The pack's upscale node against ComfyUI's built-in one, in a real headless ComfyUI, over its HTTP API.

    python bench/bench_comfy_http.py --comfy /path/to/ComfyUI --python /path/to/its/python \
        [--sizes 512,1536] [--repeats 512:5,1536:3] [--models eimn,flexnet] [--threads 1]

Needs a ComfyUI checkout whose requirements are installed for ``--python``; this script itself needs
torch, safetensors, numpy and Pillow (the pack's own requirements) and nothing else (its websocket client
is a few lines of stdlib). Everything stays on 127.0.0.1. CI cannot fetch ComfyUI: run it by hand.

What it does:
1. Writes the models into ``<ComfyUI>/models/upscale_models`` under names of its own (removed at the end):
   ``eimn`` = the pack's ``FlexSR_anime_x2`` (EIMN_A ×2), ``flexnet`` = a FlexNet ×2 in the published
   default configuration (dim 64, blocks 6×6, window 8: 3,003,628 parameters) with seeded random
   weights, ``flexnet_tiny`` = the pack's ``FlexSR_default_x2``, ``lmlt`` = the published LMLT_tiny ×2
   (``../shared/weights/LMLT_tiny_x2.pth``), ``lamnet`` = LAMNet (the released base configuration) ×2,
   ``davit`` = the DaViT-style SR transformer in its published configuration (8 blocks, dim 256, window 4,
   16 heads) at ×2, ``compact`` = spandrel's Compact as realesr-animevideov3 (64 features, 16 convs) ×2;
   the last three with seeded random weights. Links the pack into ``custom_nodes``
   (unless a folder of that name is there already) and starts ``main.py --cpu --listen 127.0.0.1``
   with ``--threads`` torch threads and its input, output and temp folders in a scratch folder.
2. Builds one API prompt per model holding both chains: LoadImage → UpscaleModelLoader →
   ImageUpscaleWithModel → PreviewImage, and the same LoadImage → FlexSR's loader → Upscale Image
   (FlexSR) (defaults: automatic tiles, overlap 32, precision auto) → PreviewImage. Each run names one
   chain's preview as its target (``partial_execution_targets``), so ComfyUI's default cache keeps both
   loaded models all along, as it does for a user who runs one workflow again and again.
3. Every run loads a new input image (a photo from ``--image``, default Set14's ``baboon`` when
   ``../shared/data`` has it, else a drawn test pattern, resized to the size, with a seeded ±2-level
   noise), so the upscale node never comes from the cache. Runs go built-in, pack, built-in, pack, …
   on the same images: pair ``i`` upscales image ``i`` with both nodes, in turns (A B, B A, ...). One untimed pair per model
   first (oneDNN's first-call set-up, the pack's one-time cost probe).
4. Times each upscale node from ComfyUI's own websocket messages: from its ``executing`` message to
   the next node's (the model loaders are cached, LoadImage and the preview are outside this span),
   as ComfyUI's process CPU time (``/proc/<pid>/stat`` read at those messages: steady on a shared
   machine with one torch thread) and as wall time between their receipt.
5. Prints per model and size the median node time of each, the ratio built-in / pack, the PSNR between
   the two nodes' outputs (8-bit PNGs from the previews; the lowest over the pairs) and the load average
   (1-minute, lowest–highest over the runs). The pack's tile plan (its node's UI text) is printed too.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from comfy_server import PACK, check_comfyui, comfyui_server, pack_in_custom_nodes  # noqa: E402 - bench/ is on sys.path

DEFAULT_IMAGE = PACK.parent / "shared" / "data" / "Set14" / "GTmod12" / "baboon.png"


# --------------------------------------------------------------------------------------------------
# A minimal websocket client (RFC 6455, client side): text frames in, nothing out but the handshake.


class WebSocket:
    def __init__(self, host: str, port: int, path: str, timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the websocket handshake was cut off")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the websocket was closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def receive(self, timeout: float) -> tuple[float, dict] | None:
        """The next text message as (receipt time, JSON), skipping binary ones; None on timeout."""
        self.sock.settimeout(timeout)
        payload = b""
        while True:
            try:
                b0, b1 = self._read(2)
            except socket.timeout:
                return None
            self.sock.settimeout(None)  # the rest of a started frame follows
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
            opcode = b0 & 0x0F
            if opcode == 8:
                raise ConnectionError("the server closed the websocket")
            if opcode in (0, 1, 2):
                payload += data if opcode != 2 else b""
                if b0 & 0x80:
                    if opcode == 2 or not payload:
                        payload = b""
                        continue
                    return time.perf_counter(), json.loads(payload)
            self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------------------
# ComfyUI


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used so far, all its threads together."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Comfy:
    def __init__(self, port: int, pid: int):
        self.port = port
        self.pid = pid
        self.base = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex
        self.ws: WebSocket | None = None

    def get(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
            return r.read()

    def wait(self, proc: subprocess.Popen, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode} while starting; see its log")
            try:
                self.get("/system_stats", timeout=2)
                self.ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}")
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer at {self.base} within {timeout:.0f} s")

    def object_info(self, node: str) -> dict:
        return json.loads(self.get(f"/object_info/{node}"))

    def run(self, prompt: dict, target: str, timeout: float) -> dict:
        """Queue ``prompt`` with only ``target`` (an output node) to execute; wait for it to end.

        Returns the wall time, each node's span between its ``executing`` message and the next (wall
        seconds, and ComfyUI's process CPU seconds read at those messages), and the history entry.
        """
        body = json.dumps({"prompt": prompt, "client_id": self.client_id,
                           "partial_execution_targets": [target]}).encode()
        request = urllib.request.Request(self.base + "/prompt", data=body,
                                         headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ComfyUI refused the prompt: {e.read()[:2000].decode(errors='replace')}") from e
        starts: list[tuple[str, float, float]] = []
        end = time.monotonic() + timeout
        done = None
        while done is None:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            got = self.ws.receive(timeout=min(left, 30))
            if got is None:
                continue
            t, msg = got
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            kind = msg.get("type")
            if kind == "executing":
                starts.append((data.get("node"), t, process_cpu(self.pid)))
                if data.get("node") is None:
                    done = t
            elif kind == "execution_error":
                raise RuntimeError(f"{data.get('node_type')} failed: {data.get('exception_type')}: "
                                   f"{data.get('exception_message')}")
            elif kind == "execution_success":
                starts.append((None, t, process_cpu(self.pid)))
                done = t
        spans = {node: (starts[i + 1][1] - t, starts[i + 1][2] - c)
                 for i, (node, t, c) in enumerate(starts[:-1]) if node is not None}
        history = {}
        for _ in range(50):  # the history entry is written right after the last message
            history = json.loads(self.get(f"/history/{prompt_id}")).get(prompt_id) or {}
            if history.get("outputs"):
                break
            time.sleep(0.1)
        return {"wall": done - t0, "spans": spans, "history": history}

    def image(self, ref: dict) -> np.ndarray:
        query = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
        return np.asarray(Image.open(io.BytesIO(self.get("/view?" + query))).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# Models, images, prompts


def _spread_flexnet():
    import torch

    from archs.flexnet import FlexNet  # the pack's archs/ is importable alone (no ComfyUI)

    model = FlexNet(scale=2)
    with torch.no_grad():  # RMSNorm weights and layer scales start at 1: give them some spread too
        for p in model.parameters():
            if p.dim() == 1:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return model


def _random_models() -> dict:
    """key -> (description, builder) of the models written with seeded random weights."""
    from spandrel.architectures.Compact import Compact

    from archs.lamnet import LAMNet_base
    from archs.transformer_sr import SR

    return {
        "flexnet": ("FlexNet ×2, published defaults (dim 64, blocks 6×6, window 8)", _spread_flexnet),
        "lamnet": ("LAMNet ×2, the released base configuration", lambda: LAMNet_base(scale=2)),
        "davit": ("DaViT-style SR transformer ×2, published configuration (8 blocks, dim 256, window 4, 16 heads)",
                  lambda: SR(factor=2, num_blocks=8, dim=256, window_size=4, num_heads=16)),
        "compact": ("Compact ×2 as realesr-animevideov3 (64 features, 16 convs)",
                    lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=2)),
    }


MODEL_KEYS = ("eimn", "flexnet", "flexnet_tiny", "lmlt", "lamnet", "davit", "compact")


def write_models(folder: Path, which: list[str], seed: int) -> dict[str, dict]:
    """``which`` → {"file": name in upscale_models, "what": description}; files written into ``folder``."""
    sys.path.insert(0, str(PACK))
    import torch
    from safetensors.torch import save_file

    RANDOM = _random_models()

    out = {}
    for key in which:
        name = f"flexsr_bench_{key}_x2.safetensors"
        if key == "eimn":
            shutil.copyfile(PACK / "models" / "FlexSR_anime_x2.safetensors", folder / name)
            what = "EIMN_A ×2 (the pack's FlexSR_anime_x2)"
        elif key == "flexnet_tiny":
            shutil.copyfile(PACK / "models" / "FlexSR_default_x2.safetensors", folder / name)
            what = "FlexNet ×2 dim 16, blocks 2+2 (the pack's FlexSR_default_x2)"
        elif key == "lmlt":
            weights = PACK.parent / "shared" / "weights" / "LMLT_tiny_x2.pth"
            if not weights.is_file():
                raise SystemExit(f"lmlt needs the published LMLT_tiny ×2 weights at {weights}")
            name = f"flexsr_bench_{key}_x2.pth"
            shutil.copyfile(weights, folder / name)
            what = "LMLT_tiny ×2 (the published weights)"
        elif key in RANDOM:
            label, build = RANDOM[key]
            torch.manual_seed(seed)
            model = build()
            sd = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(sd, str(folder / name))
            count = sum(p.numel() for p in model.parameters())
            what = f"{label}, {count:,} params, random (seed {seed})"
        else:
            raise SystemExit(f"unknown model {key!r}: choose from {', '.join(MODEL_KEYS)}")
        out[key] = {"file": name, "what": what}
    return out


def base_image(path: Path | None) -> np.ndarray:
    """A uint8 RGB picture: the given photo, else a drawn pattern (edges, gradients, text-like strokes)."""
    if path is not None and path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    h = w = 256
    y, x = np.mgrid[0:h, 0:w] / 255.0
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x * y)], -1)
    for _ in range(40):
        y0, x0 = rng.integers(0, h - 20, 2)
        img[y0 : y0 + rng.integers(2, 20), x0 : x0 + rng.integers(2, 60)] = rng.random(3)
    return (img * 255).astype(np.uint8)


def make_input(base: np.ndarray, size: int, seed: int) -> Image.Image:
    """``base`` resized to ``size``² (bicubic) plus seeded noise of ±2 levels: a new file's worth of pixels."""
    img = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-2, 3, img.shape, dtype=np.int16)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def build_prompt(model_file: str, image_name: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "10": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_file}},
        "11": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["10", 0], "image": ["1", 0]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
        "20": {"class_type": "FlexSRLoadUpscaleModel", "inputs": {"model_name": model_file}},
        "21": {"class_type": "FlexSRUpscaleImage", "inputs": {
            "upscale_model": ["20", 0], "image": ["1", 0], "tile_size": 0, "overlap": 32, "precision": "auto",
            "target_scale": 0.0, "alpha": "model"}},
        "22": {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}},
    }


CHAINS = {"built-in": ("11", "12"), "pack": ("21", "22")}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --------------------------------------------------------------------------------------------------


def parse_repeats(text: str, sizes: list[int]) -> dict[int, int]:
    out = {s: 3 for s in sizes}
    for part in filter(None, text.split(",")):
        if ":" in part:
            s, n = part.split(":")
            out[int(s)] = int(n)
        else:
            out = {s: int(part) for s in sizes}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", type=Path, required=True, help="ComfyUI checkout (holds main.py)")
    ap.add_argument("--python", default=sys.executable, help="the python that runs ComfyUI (default: this one)")
    ap.add_argument("--models", default="eimn,flexnet", help=", ".join(MODEL_KEYS) + " (comma-separated)")
    ap.add_argument("--sizes", default="512,1536", help="input sides in px (square inputs)")
    ap.add_argument("--repeats", default="512:5,1536:3", help="timed pairs per size: N or SIZE:N,...")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in ComfyUI (OMP_NUM_THREADS)")
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="picture the inputs are made from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    ap.add_argument("--keep", type=Path, help="keep ComfyUI's log and the scratch folder here")
    args = ap.parse_args()

    comfy = check_comfyui(args.comfy)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeats = parse_repeats(args.repeats, sizes)
    scratch = Path(tempfile.mkdtemp(prefix="flexsr_bench_comfy_"))
    folders = {sub: scratch / sub for sub in ("input", "output", "temp")}
    for folder in folders.values():
        folder.mkdir()
    models_dir = comfy / "models" / "upscale_models"
    models_dir.mkdir(parents=True, exist_ok=True)
    models = write_models(models_dir, [m for m in args.models.split(",") if m], args.seed)
    log_path = scratch / "comfyui.log"
    client = None
    records = []
    try:
        with pack_in_custom_nodes(comfy, "FlexSR_bench"), \
                comfyui_server(comfy, args.python, args.port, log_path, args.threads, folders) as proc:
            print("ComfyUI:", " ".join(proc.args), f"(OMP_NUM_THREADS={args.threads}, nice {os.nice(0)})",
                  flush=True)
            client = Comfy(args.port, proc.pid)
            client.wait(proc, 300)
            for node in ("FlexSRUpscaleImage", "ImageUpscaleWithModel"):
                if node not in client.object_info(node):
                    raise RuntimeError(f"ComfyUI does not know {node}; is the pack loaded? see {log_path}")
            base = base_image(args.image)
            picture = args.image.name if args.image and args.image.is_file() else "a drawn pattern"
            print(f"inputs: {picture}, resized, ±2 levels of seeded noise per run", flush=True)
            counter = 0

            def run_pair(key: str, size: int, timed: bool) -> dict:
                nonlocal counter
                counter += 1
                name = f"bench_{key}_{size}_{counter}.png"
                make_input(base, size, args.seed * 100_000 + counter).save(scratch / "input" / name)
                prompt = build_prompt(models[key]["file"], name)
                row = {"model": key, "size": size, "timed": timed, "image": name}
                outputs = {}
                order = list(CHAINS) if counter % 2 else list(CHAINS)[::-1]  # A B, B A, A B, ...
                for chain in order:
                    node, preview = CHAINS[chain]
                    r = client.run(prompt, preview, args.timeout)
                    ui = r["history"]["outputs"]
                    wall, cpu = r["spans"][node]
                    row[chain] = {"node_cpu_s": cpu, "node_s": wall, "wall_s": r["wall"], "load": os.getloadavg()[0]}
                    if chain == "pack":
                        row["plan"] = "\n".join((ui.get(node) or {}).get("flexsr_plan", []))
                    outputs[chain] = client.image(ui[preview]["images"][0])
                row["psnr"] = psnr(outputs["built-in"], outputs["pack"])
                row["shape"] = list(outputs["pack"].shape)
                shown = " ".join(f"{c} {row[c]['node_cpu_s']:.2f} s CPU ({row[c]['node_s']:.2f} s wall)" for c in CHAINS)
                print(f"  {key} {size}² {'timed ' if timed else 'warm-up'} {shown} ratio "
                      f"{row['built-in']['node_cpu_s'] / row['pack']['node_cpu_s']:.3f} PSNR {row['psnr']:.1f} dB "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                records.append(row)
                return row

            for key in models:
                run_pair(key, min(sizes), timed=False)
                for size in sizes:
                    for _ in range(repeats[size]):
                        run_pair(key, size, timed=True)
    finally:
        if client and client.ws:
            client.ws.close()
        for info in models.values():
            (models_dir / info["file"]).unlink(missing_ok=True)
        if args.keep:
            shutil.copytree(scratch, args.keep, dirs_exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)

    print()
    for key, info in models.items():
        print(f"{key}: {info['what']}")
    print(f"ComfyUI {comfy_version(comfy)} on CPU, {args.threads} torch thread(s). Node time: from ComfyUI's "
          f"'executing' message for the upscale node to the next node's; CPU = ComfyUI's process CPU time "
          f"over that span, wall = receipt times; medians over the timed pairs; ratio = built-in / pack.")
    print()
    header = ("| model | input → output | pairs | built-in CPU s | pack CPU s | **ratio (CPU)** | built-in wall s | "
              "pack wall s | ratio (wall) | PSNR built-in vs pack | load avg (1 min) | pack's plan |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for key in models:
        for size in sizes:
            rows = [r for r in records if r["model"] == key and r["size"] == size and r["timed"]]
            if not rows:
                continue
            cpu = {c: statistics.median(r[c]["node_cpu_s"] for r in rows) for c in CHAINS}
            wall = {c: statistics.median(r[c]["node_s"] for r in rows) for c in CHAINS}
            loads = [r[c]["load"] for r in rows for c in CHAINS]
            h, w = rows[0]["shape"][:2]
            plan = (rows[-1].get("plan") or "?").splitlines()[0]
            print(f"| {key} | {size}² → {w}×{h} | {len(rows)} | {cpu['built-in']:.2f} | {cpu['pack']:.2f} | "
                  f"**{cpu['built-in'] / cpu['pack']:.2f}×** | {wall['built-in']:.2f} | {wall['pack']:.2f} | "
                  f"{wall['built-in'] / wall['pack']:.2f}× | {min(r['psnr'] for r in rows):.1f} dB | "
                  f"{min(loads):.1f}–{max(loads):.1f} | {plan} |")
    if args.json:
        args.json.write_text(json.dumps({"models": models, "runs": records}, indent=1))
    return 0


def comfy_version(comfy: Path) -> str:
    try:
        text = (comfy / "comfyui_version.py").read_text()
        return text.split("__version__ =", 1)[1].split()[0].strip("\"'")
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
