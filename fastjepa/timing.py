"""Choosing between implementations by timing them where the run runs: at its own shapes, on its own GPU.

``attn_backend: auto`` and ``block_impl: auto`` both resolve this way before anything is compiled, so a GPU the
authors never measured still gets its fastest path and a slower kernel can never become the default by mistake.
"""

from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream (CUDA events), after one untimed warm-up call
    (compilation, kernel selection and lazy initialisation happen there)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def fastest(candidates: dict[str, Callable[[], object]], reps: int = 5) -> tuple[str | None, dict[str, float | str]]:
    """Time every candidate; returns the fastest name (None when every one failed) and ``{name: milliseconds, or
    why it was excluded}``. A candidate that raises (a kernel rejecting a shape or dtype, a compiler bug) is
    excluded, never chosen."""
    times: dict[str, float | str] = {}
    for name, fn in candidates.items():
        try:
            times[name] = time_ms(fn, reps)
        except Exception as err:  # noqa: BLE001 -- any failure excludes the candidate; the run goes on
            times[name] = f"failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:120]}"
    timed = {n: t for n, t in times.items() if isinstance(t, float)}
    return (min(timed, key=timed.get) if timed else None), times


def describe(times: dict[str, float | str]) -> str:
    """``"fused 0.91 ms, compile 1.20 ms"``: the timings of ``fastest`` for a log line."""
    return ", ".join(f"{n} {t:.3f} ms" if isinstance(t, float) else f"{n} {t}" for n, t in times.items())
