"""What a person waiting for a command sees: a tqdm bar on a terminal; elsewhere (a log file, CI, a pipe) a plain
line at least every ``every_s`` seconds with the count, the rate and, when the total is known, the ETA, then a
done line. The training loop has its own (``fastjepa.metrics.MetricsSink``); this one serves the other commands."""

import sys
import time


class Progress:
    """``with Progress("probe train", "img") as bar: bar.update(n)``; ``disable`` prints nothing."""

    def __init__(self, what: str, unit: str, total: int | None = None, initial: int = 0, every_s: float = 10.0,
                 disable: bool = False, stream=None):
        self.what, self.unit, self.total, self.every_s = what, unit, total, every_s
        self.stream = stream or sys.stderr
        self.n = self.initial = initial
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        self.lines = not disable and not self.stream.isatty()
        if not disable and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(desc=what, total=total, initial=initial, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            self._line(self._status())

    def _status(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.initial) / max(elapsed, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = f", ETA {(self.total - self.n) / rate:.0f} s" if self.total and rate > 0 else ""
        return f"{done} {self.unit} ({rate:.1f} {self.unit}/s{eta})"

    def _line(self, text: str) -> None:
        print(f"{self.what}: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line(f"done, {self._status()} in {time.perf_counter() - self.t0:.0f} s")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def counted(batches, what: str, total: int | None = None):
    """``(images, labels)`` batches passed through, their images counted by a ``Progress``."""
    with Progress(what, "img", total=total) as bar:
        for images, labels in batches:
            yield images, labels
            bar.update(len(images))
