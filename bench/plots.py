"""The benchmark suite's charts, drawn with matplotlib (the ``bench`` extra): horizontal bars with their labels in
full, values at the bar ends, a title naming the device."""

import sys
from pathlib import Path

_HINT_SHOWN = []


def _pyplot():
    """matplotlib's pyplot, or None (after one hint per process) when it is not installed: the results are
    written either way, only the charts are skipped."""
    try:
        import matplotlib
    except ImportError:
        if not _HINT_SHOWN:
            print("charts skipped: matplotlib is not installed (pip install 'fastjepa[bench]' or matplotlib)",
                  file=sys.stderr, flush=True)
            _HINT_SHOWN.append(True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(rows: list[dict], path: Path) -> None:
    """GB/s of one op per (shape, mode, provider); the share of the copy roof only on a GPU, where it means
    something."""
    plt = _pyplot()
    if plt is None:
        return
    gpu = rows[0]["device"].lower().startswith(("nvidia", "amd")) or "gpu" in rows[0]["device"].lower()
    labels = [f"{r['shape']}  {r['mode']}  {r['provider']}" for r in rows]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = [plt.cm.tab10(providers.index(r["provider"]) % 10) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.4))
    bars = ax.barh(range(len(rows)), [r["gbps"] for r in rows], color=colors)
    notes = [f"{r['gbps']:.3g}" + (f" ({100 * r['frac_of_copy']:.0f}% of copy)" if gpu else "") for r in rows]
    ax.bar_label(bars, notes, padding=3, fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s of ideal traffic")
    ax.set_title(f"{rows[0]['op']} on {rows[0]['device']}")
    ax.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def phase_chart(rows: list[dict], phases: tuple[str, ...], path: Path) -> None:
    """Median ms per phase of a training step, stacked, one bar per (model, provider)."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    for i, phase in enumerate(phases):
        widths = [r[f"{phase}_ms"] for r in rows]
        if any(widths):
            ax.barh(range(len(rows)), widths, left=left, color=plt.cm.tab10(i % 10), label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    for j, r in enumerate(rows):
        ax.text(left[j], j, f"  {r['step_ms']:.1f} ms, {r['images_per_s']:.0f} img/s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['model']}  {r['provider']}" for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("median ms per step")
    ax.set_title(f"training step by phase on {rows[0]['device']}")
    ax.margins(x=0.3)
    ax.legend(fontsize=8, ncols=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
