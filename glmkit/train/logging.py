"""Run bookkeeping: a jsonl metrics log (plus TensorBoard when installed), a loss-curve PNG and a progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.out, self.enabled = Path(out), enabled
        self.records: list[dict] = []
        self._tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        if path.exists():  # a resumed run continues the same log
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self._file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:
            self._tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": time.time()}
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, record["step"])

    def plot(self) -> Path | None:
        """Training loss and held-out loss per objective against step, written to ``loss.png``."""
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        if not self.enabled or not train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
        keys = sorted({k for r in self.records for k in r if k.startswith("eval/")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in self.records if k in r]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"held-out {k[5:]}")
        ax.set_xlabel("step")
        ax.set_ylabel("blank-infilling loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


class ProgressBar:
    """A rich progress bar showing loss, tokens/s and ETA; silent when disabled (other ranks, tests)."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self._p.start()
        self._task = self._p.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if self.enabled:
            self._p.update(self._task, completed=step, info=f"loss {loss:.3f} · {tok_s:,.0f} tok/s")

    def close(self) -> None:
        if self.enabled:
            self._p.stop()
