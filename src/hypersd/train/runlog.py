"""A run's log: one JSON object a line in ``OUT/log.jsonl``, and the same scalars in TensorBoard or W&B.

The file is opened in append mode and flushed line by line, so it can be read (``tail -f``, pandas)
while the run goes on, and a ``--resume`` continues it. A resumed run repeats the steps after its
last checkpoint: it first writes a ``run_start`` record with ``resume: true``, and the step lines
after it stand for those global steps (readers keep the last line of each global step).
Under ``accelerate launch`` only the main process writes; the others hold a log that does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from hypersd.errors import HypersdError

FILE = "log.jsonl"
TRACKERS = ("tensorboard", "wandb")


def _available(name: str) -> bool:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    return bool({"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]())


def check_trackers(log_with: list[str] | None) -> list[str]:
    """The trackers asked for, each known and installed; else an error naming the extra to install."""
    names = list(dict.fromkeys(log_with or []))
    for name in names:
        if name not in TRACKERS:
            raise HypersdError(f"unknown tracker {name!r}; use one of {', '.join(TRACKERS)}")
        if not _available(name):
            raise HypersdError(f"--log-with {name}: the {name} package is not installed; "
                               f"install it with pip install 'hypersd[{name}]'")
    return names


def _tracker(name: str, out: Path):
    from accelerate import tracking

    if name == "tensorboard":  # events under OUT/tensorboard/<run>: 'tensorboard --logdir OUT/tensorboard'
        return tracking.TensorBoardTracker(out.resolve().name, out / "tensorboard")
    return tracking.WandBTracker("hypersd", name=out.resolve().name, dir=str(out))


def _number(v) -> float | None:
    """A loss or norm as a JSON number; None where it is not finite (strict JSON has no NaN)."""
    v = float(v.detach()) if hasattr(v, "detach") else float(v)
    return v if math.isfinite(v) else None


def _cut_torn_line(path: Path) -> None:
    """A kill in mid-line leaves half a record at the end: cut it, so that the next record, appended
    by a resumed run, starts a line of its own instead of making that line unreadable."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, 2)
        tail_start = max(0, end - 65536)  # a record is far shorter than this
        f.seek(tail_start)
        tail = f.read()
        if tail and not tail.endswith(b"\n"):
            f.truncate(tail_start + tail.rfind(b"\n") + 1)


class RunLog:
    def __init__(self, out_dir: str | Path, is_main: bool = True, log_with: list[str] | None = None):
        self.out, self.is_main = Path(out_dir), is_main
        self.log_with = check_trackers(log_with)
        self.path = self.out / FILE
        self._file, self._trackers = None, None

    def _open(self):
        if self._file is None:  # at the first record: a run refused at setup leaves no log behind
            self.out.mkdir(parents=True, exist_ok=True)
            _cut_torn_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            self._trackers = [_tracker(n, self.out) for n in self.log_with]
            for t in self._trackers:
                t.start()
        return self._file

    def write(self, kind: str, **fields) -> None:
        """One record: ``kind``, the wall-clock ``time``, ``fields``."""
        if not self.is_main:
            return
        f = self._open()
        f.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}, allow_nan=False) + "\n")
        f.flush()

    def step(self, stage: str, step: int, global_step: int, logs: dict | None, seconds: float,
             skipped: dict[str, int]) -> None:
        """The stage's ``step``-th optimizer step (from 1); ``logs`` None for a skipped one; ``skipped``: the
        stage's counts so far."""
        if not self.is_main:
            return
        skipped_now, logs = logs is None, dict(logs or {})
        lr, grad_norm = logs.pop("lr", None), logs.pop("grad_norm", None)
        losses = {k: _number(v) for k, v in logs.items()}
        record = {"stage": stage, "step": step, "global_step": global_step, "skipped": skipped_now,
                  "losses": losses, "lr": lr, "grad_norm": None if grad_norm is None else _number(grad_norm),
                  "seconds": round(seconds, 4), "skipped_so_far": dict(skipped)}
        self.write("step", **record)
        scalars = {f"loss/{k}": v for k, v in losses.items() if v is not None}
        scalars |= {k: v for k, v in (("lr", lr), ("grad_norm", record["grad_norm"]),
                                      ("step_seconds", record["seconds"])) if v is not None}
        for t in self._trackers:
            t.log(scalars, step=global_step)

    def close(self) -> None:
        if self._file is not None:
            for t in self._trackers:
                t.finish()
            self._file.close()
            self._file, self._trackers = None, None


# -- reading ---------------------------------------------------------------------------------
def read(run_dir: str | Path) -> list[dict]:
    """The records of a run's log; a line cut short by a kill (the last one) is left out."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise HypersdError(f"{path} not found; 'hypersd distill --out {run_dir}' writes it")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise HypersdError(f"{path} line {n} is not JSON; was the file edited?") from None
    return records


def steps(records: list[dict]) -> list[dict]:
    """The step records, one per global step: where a resume repeated steps, the later ones."""
    last = {r["global_step"]: r for r in records if r["kind"] == "step"}
    return [last[g] for g in sorted(last)]


def summary(run_dir: str | Path) -> str:
    """A table, one row per stage: steps, losses (first and last tenth of the steps), lr, grad norm, time."""
    records = read(run_dir)
    by_stage: dict[str, list[dict]] = {}
    for r in steps(records):
        by_stage.setdefault(r["stage"], []).append(r)
    rows = ["| stage | steps | skipped | loss: start -> end | lr | grad norm (mean / max) | s/step |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage, rs in by_stage.items():
        done = [r for r in rs if not r["skipped"]]
        k = max(1, len(done) // 10)
        names = list(dict.fromkeys(n for r in done for n in r["losses"]))
        losses = ", ".join(f"{n} {_mean(done[:k], n):.4g} -> {_mean(done[-k:], n):.4g}" for n in names)
        norms = [r["grad_norm"] for r in done if r["grad_norm"] is not None]
        lrs = sorted({r["lr"] for r in done if r["lr"] is not None})
        rows.append(f"| {stage} | {len(rs)} | {len(rs) - len(done)} | {losses or '-'} | "
                    f"{', '.join(f'{v:g}' for v in lrs) or '-'} | "
                    + (f"{sum(norms) / len(norms):.3g} / {max(norms):.3g}" if norms else "-")
                    + f" | {sum(r['seconds'] for r in rs) / len(rs):.3g} |")
    resumes = sum(r["kind"] == "run_start" and r.get("resume") for r in records)
    tail = f"\n{resumes} resume(s); repeated steps shown once (the later run's)" if resumes else ""
    return "\n".join(rows) + tail


def _mean(rs: list[dict], name: str) -> float:
    vs = [r["losses"][name] for r in rs if r["losses"].get(name) is not None]
    return sum(vs) / len(vs) if vs else math.nan
