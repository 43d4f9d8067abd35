"""Per-epoch metrics to CSV, JSON and (if installed) TensorBoard; rank 0 only."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path


class MetricLog:
    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.dir = Path(out_dir)
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        jpath = self.dir / "metrics.json"
        if jpath.exists():  # resuming: keep earlier epochs
            try:
                self.rows = json.loads(jpath.read_text())
            except ValueError:
                self.rows = []
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")] + [row]
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = self.dir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.dir / "metrics.csv")
        tmp = self.dir / ".metrics.json.tmp"
        tmp.write_text(json.dumps(self.rows, indent=1))
        os.replace(tmp, self.dir / "metrics.json")
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
