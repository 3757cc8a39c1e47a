"""What a run writes as it goes: the metrics file (``metrics.jsonl``, and TensorBoard when it is installed and
wanted) and the copy of the log in ``train.log``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("flexsr")

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
