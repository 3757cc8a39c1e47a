"""A headless ComfyUI with this pack in it, for the scripts that drive a real one (``comfy_frontend_check.py``,
``bench_comfy_http.py``).

    with pack_in_custom_nodes(comfy, "FlexSR_bench"), comfyui_server(comfy, python, port, log) as proc:
        wait_http(f"http://127.0.0.1:{port}/system_stats", 240, proc)
        ...

Both undo what they did on the way out: the link into ``custom_nodes`` is removed, the server is stopped
(terminated, killed after 30 s).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PACK = Path(__file__).resolve().parents[1]


def check_comfyui(comfy: Path) -> Path:
    """``comfy`` resolved, or SystemExit when it is not a ComfyUI checkout."""
    comfy = Path(comfy).resolve()
    if not (comfy / "main.py").is_file():
        raise SystemExit(f"{comfy} holds no main.py: it must be a ComfyUI checkout")
    return comfy


@contextmanager
def pack_in_custom_nodes(comfy: Path, link_name: str) -> Iterator[Path]:
    """The pack's folder as ComfyUI sees it: a folder of ``custom_nodes`` that already is the pack, else a
    symlink ``link_name`` made for the duration."""
    nodes_dir = comfy / "custom_nodes"
    present = next((p for p in nodes_dir.iterdir() if p.is_dir() and p.resolve() == PACK), None)
    if present is not None:
        yield present
        return
    link = nodes_dir / link_name
    link.symlink_to(PACK, target_is_directory=True)
    try:
        yield link
    finally:
        link.unlink(missing_ok=True)


@contextmanager
def comfyui_server(comfy: Path, python: str, port: int, log_path: Path, threads: int = 1,
                   folders: dict[str, Path] | None = None) -> Iterator[subprocess.Popen]:
    """``main.py --cpu`` on 127.0.0.1:``port`` with ``threads`` torch threads, its output in ``log_path``;
    ``folders`` maps ComfyUI's ``input``/``output``/``temp`` to folders of the caller's."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if os.sep in python:  # a path relative to the caller's folder (ComfyUI runs in its own): made absolute, not resolved
        python = os.path.abspath(python)  # (resolving a venv's python link would leave the venv)
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"]
    for kind, folder in (folders or {}).items():
        cmd += [f"--{kind}-directory", str(folder)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 200; fail early when ``proc`` (the server) exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode} while starting; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"ComfyUI did not answer at {url} within {timeout:.0f} s")
