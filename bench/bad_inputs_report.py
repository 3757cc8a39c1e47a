"""The loader's bad-input table: every crafted or damaged file, the error it gets, its time and memory.

    python bench/bad_inputs_report.py                     # all cases in this process
    python bench/bad_inputs_report.py --isolate           # one process per case, watched (RSS cap, timeout)
    python bench/bad_inputs_report.py --isolate --root ../other-checkout --only flexnet:

The cases are ``tests/crafted.py``'s (the same table ``tests/test_bad_inputs.py`` asserts). For each:
file size, the exception type (or LOADED), wall time of ``archs.load_model``, and the peak RSS growth
during the call: the kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
before each case) minus the RSS before it. ``--isolate`` runs each case in a fresh interpreter whose
watchdog ends it when the load grows RSS past ``--cap-mb`` or runs past ``--timeout`` (for checkouts
without the guards, where a crafted file exhausts memory); ``--root`` loads with another checkout's ``archs``.
Nothing is asserted here; one thread; the load average is printed beside.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _status(field: str, pid: str = "self") -> int:
    """A ``/proc/<pid>/status`` size field in bytes (0 where unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _setup(root: Path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for p in (str(HERE / "tests"), str(root)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    import torch

    torch.set_num_threads(1)
    import archs  # noqa: F401 - the checkout under test
    import crafted

    return crafted


def run_case(crafted, name: str, folder: Path, cap: int = 0, timeout: float = 0.0) -> dict:
    """Load one case's file; with ``cap``/``timeout`` a watchdog ends the process when the load passes
    ``cap`` bytes of RSS growth or ``timeout`` seconds (printing the result line first)."""
    import archs

    build, expected = crafted.all_cases()[name]
    path = build(folder)
    size = path.stat().st_size
    exact = _reset_peak()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if cap or timeout:
        import threading

        def watchdog() -> None:
            while True:
                grown, spent = _status("VmRSS") - before, time.perf_counter() - t0
                why = (f"killed at +{grown / 2**20:,.0f} MiB" if cap and grown > cap
                       else f"killed after {spent:.0f} s" if timeout and spent > timeout else "")
                if why:
                    print(json.dumps({"case": name, "expected": expected, "got": why, "size": size,
                                      "seconds": spent, "rss_growth": grown, "exact_peak": False}), flush=True)
                    os._exit(0)
                time.sleep(0.01)

        threading.Thread(target=watchdog, daemon=True).start()
    try:
        archs.load_model(path)
        got = "LOADED"
    except Exception as e:  # noqa: BLE001 - the point is to see which
        got = type(e).__name__
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") if exact else _status("VmRSS")
    path.unlink()
    return {"case": name, "expected": expected, "got": got, "size": size, "seconds": seconds,
            "rss_growth": max(0, peak - before), "exact_peak": exact}


def _isolated(name: str, root: Path, cap: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--root", str(root), "--cap-mb", str(cap / 2**20),
           "--timeout", str(timeout)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = proc.stdout.strip().splitlines()
    except subprocess.TimeoutExpired:
        lines = []
    if lines:
        return json.loads(lines[-1])
    return {"case": name, "got": "no result", "seconds": 0, "rss_growth": 0, "size": 0, "expected": "?",
            "exact_peak": False}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=HERE, help="checkout whose archs loads the files (default: this one)")
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    ap.add_argument("--kind", choices=("all", "structure", "damaged", "files", "bombs"), default="all",
                    help="structure: keys/shapes claiming a larger model; damaged: NaN/Inf/int/zero-size weights; "
                    "files: not-a-checkpoint, truncated, pickles, header attacks; bombs: small files that unpickle, "
                    "unpack or materialise into gigabytes")
    ap.add_argument("--isolate", action="store_true", help="one watched process per case")
    ap.add_argument("--cap-mb", type=float, default=4096, help="--isolate: end a case whose load grows RSS past this (MiB)")
    ap.add_argument("--timeout", type=float, default=30, help="--isolate: end a case whose load runs this many seconds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.root.resolve()

    if args.child:
        crafted = _setup(root)
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(run_case(crafted, args.child, Path(d), int(args.cap_mb * 2**20), args.timeout)))
        return 0

    crafted = _setup(root)
    kinds = {"structure": crafted.structure_cases(), "damaged": crafted.damaged_weight_cases(),
             "files": crafted.corrupt_file_cases(), "bombs": crafted.bomb_cases()}
    pool = crafted.all_cases() if args.kind == "all" else kinds[args.kind]
    names = [n for n in pool if args.only in n]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            if args.isolate:
                r = _isolated(name, root, int(args.cap_mb * 2**20), args.timeout)
            else:
                r = run_case(crafted, name, Path(d))
            rows.append(r)
            ok = "" if r["got"] == r["expected"] else "   <-- expected " + r["expected"]
            print(f"{r['case'][:60]:60s} {r['size'] / 1024:8.1f} KiB  {r['got']:26s} {r['seconds'] * 1000:9.1f} ms "
                  f"{r['rss_growth'] / 2**20:8.1f} MiB{ok}", flush=True)
    from bench.common import machine_note

    worst_t = max(rows, key=lambda r: r["seconds"])
    worst_m = max(rows, key=lambda r: r["rss_growth"])
    wrong = [r["case"] for r in rows if r["got"] != r["expected"]]
    print(f"\n{len(rows)} cases from {root}; {len(rows) - len(wrong)} got the expected error type"
          + (f"; not: {', '.join(wrong)}" if wrong else ""))
    print(f"slowest: {worst_t['case']} {worst_t['seconds'] * 1000:.1f} ms; largest peak RSS growth: "
          f"{worst_m['case']} {worst_m['rss_growth'] / 2**20:.1f} MiB"
          + ("" if all(r.get("exact_peak") for r in rows) else " (RSS high-water mark not resettable here)"))
    print(machine_note())
    return 0


if __name__ == "__main__":
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    sys.exit(main())
