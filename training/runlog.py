"""What a run writes as it goes: the metrics file (``metrics.jsonl``, and TensorBoard when it is installed and
wanted) and the copy of the log in ``train.log``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from archs.errors import FlexSRError

log = logging.getLogger("flexsr")

LOCK_NAME = ".run.lock"


class RunLockedError(FlexSRError):
    """Another process is running the same run folder."""


class RunLock:
    """An exclusive lock on a run folder for as long as a process trains in it (``with RunLock(out): ...``).

    ``flock`` on ``<out>/.run.lock``: the kernel drops it when the process ends however it ends, so a lock left
    by a killed run never blocks the next one (a stale lock file is simply taken over). The file holds the pid
    of the holder, which the refusal names. Where ``fcntl`` is missing (Windows) the lock is a no-op.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by a running training process (pid {holder}): wait "
                                 f"for it to finish or stop it, or use another --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file stays (harmless, reused next time)
            self.fd = None

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Rank 0's JSONL metrics file (and TensorBoard when it is installed and wanted)."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.path = out / METRICS_NAME
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                log.debug("TensorBoard is not installed; metrics go to %s only.", self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def setup_file_logging(out: Path) -> logging.Handler:
    """Copy the ``flexsr`` log to ``out/train.log``; the caller removes and closes the handler."""
    handler = logging.FileHandler(out / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler
