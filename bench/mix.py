"""What the calibration mix keeps on a demo model: the arithmetic task against the rest.

    python bench/mix.py [--model demo-fine] [--ratio 0.25] [--methods mone,reap] [--shares 0:1:0.1,0.95,0.99]
                        [--task-examples 200] [--heldout 32] [--out DIR] [--figure docs/mix-fine.png]

Calibrates the model once per demo domain (256 × 128 tokens each, as docs/measurements.md's demo-fine
sweep, cached under cache/), mixes the four domains other than arithmetic at equal shares into
"the rest", and for each method (its default mode: MoNE novices, REAP removal) runs
`moeviz.evaluate.mix_tradeoff` as arithmetic's share of the calibration goes from 0 to 1 (steps
of 0.1, and finer past 0.9, where MoNE's and REAP's arithmetic comes back): the
plan of each mix applied in place, the five demo tasks scored (--task-examples items each, the
same items for every mix and for the original) and KL / top-1 against the original on --heldout
held-out sequences of arithmetic and of the rest. Share 0.2 is the even mix of all five domains.

Writes DIR/mix.json (every figure, the original's task accuracies and each mix's pruned
experts), prints a markdown table per method, and draws --figure: arithmetic and the mean of
the other four tasks, as fractions of the original, against arithmetic's share (a plotly
figure screenshotted by headless Chromium; skipped with --figure '').

Time on the 2-core machine, shared with other jobs: about 75 s to calibrate the five domains
(once; cached), then 15 s a mix per method at 200 task items and 32 held-out sequences per
source: about 9 minutes in all for 16 shares × 2 methods.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeviz.calibrate import CalibConfig, calibrate  # noqa: E402
from moeviz.checkpoint import demo_names  # noqa: E402
from moeviz.demo.corpus import DOMAINS  # noqa: E402
from moeviz.demo.tasks import task_accuracies  # noqa: E402
from moeviz.evaluate import mix_tradeoff  # noqa: E402
from moeviz.loading import load_model, model_fingerprint  # noqa: E402
from moeviz.methods import PlanConfig  # noqa: E402
from moeviz.stats import ExpertStats  # noqa: E402

TASK = "arithmetic"  # the fragile task on demo-fine (docs/measurements.md: 0.51 at 25 % under MoNE novices)
OTHERS = [d for d in DOMAINS if d != TASK]
KEEP = 0.9  # the bar: a mix that keeps the task at 0.9 of the original


def domain_stats(model, tokenizer, samples: int, cache_dir: Path) -> dict[str, ExpertStats]:
    """One calibration per demo domain, `samples` × 128 tokens each, cached."""
    stats = {}
    for domain in DOMAINS:
        start = time.perf_counter()
        config = CalibConfig(data=f"demo:{domain}", num_samples=samples, seq_len=128, cache_dir=cache_dir)
        stats[domain], path = calibrate(model, config, tokenizer)
        print(f"calibrated {domain}: {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return stats


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def summarise(row: dict, original: dict[str, float], n: int) -> dict:
    """A mix's tasks as fractions of the original, with standard errors (binomial, over the
    pruned model's items; the original's are 1.00 or near it on demo-fine)."""
    tasks = {d: row["tasks"][d] / original[d] for d in DOMAINS}
    se = {d: binomial_se(row["tasks"][d], n) / original[d] for d in DOMAINS}
    rest = sum(tasks[d] for d in OTHERS) / len(OTHERS)
    rest_se = math.sqrt(sum(se[d] ** 2 for d in OTHERS)) / len(OTHERS)
    return dict(share=row["share"], task=tasks[TASK], task_se=se[TASK], rest_mean=rest, rest_mean_se=rest_se,
                tasks=tasks, tasks_se=se, accuracy=row["tasks"],
                kl={name: s["kl"] for name, s in row["sources"].items()},
                top1_agreement={name: s["top1_agreement"] for name, s in row["sources"].items()})


def best_mix(rows: list[dict]) -> dict | None:
    """The smallest share of the task that keeps it at KEEP of the original, or None."""
    kept = [r for r in rows if r["task"] >= KEEP]
    return min(kept, key=lambda r: r["share"]) if kept else None


def markdown(method: str, rows: list[dict], even: float) -> str:
    head = (f"| share of {TASK} | {TASK} | other four (mean) | " + " | ".join(OTHERS)
            + f" | KL {TASK} | KL rest |\n|" + "---|" * (len(OTHERS) + 5))
    lines = [f"**{method}** (fractions of the original ± SE)", "", head]
    for r in rows:
        mark = " (even)" if math.isclose(r["share"], even) else ""
        cells = [f"{r['share']:g}{mark}", f"**{r['task']:.2f}** ± {r['task_se']:.2f}",
                 f"**{r['rest_mean']:.2f}** ± {r['rest_mean_se']:.2f}",
                 *(f"{r['tasks'][d]:.2f} ± {r['tasks_se'][d]:.2f}" for d in OTHERS),
                 f"{r['kl'][TASK]:.2f}", f"{r['kl']['rest']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict[str, list[dict]], even: float, ratio: float, model_name: str):
    """Per method (a panel each): the task and the mean of the other four against the share."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from moeviz.plots import LINES

    names = list(results)
    fig = make_subplots(rows=1, cols=len(names), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"{m} at {ratio:.0%}" for m in names])
    series = ((TASK, "task", "task_se", LINES[3]), ("other four tasks (mean)", "rest_mean", "rest_mean_se", LINES[4]))
    for col, method in enumerate(names, start=1):
        rows = results[method]
        x = [r["share"] for r in rows]
        for label, key, se_key, colour in series:
            fig.add_trace(go.Scatter(
                x=x, y=[r[key] for r in rows], mode="lines+markers", name=label, legendgroup=label,
                showlegend=col == 1, line=dict(color=colour),
                error_y=dict(type="data", array=[r[se_key] for r in rows], thickness=1, width=3),
            ), row=1, col=col)
        fig.add_vline(x=even, line=dict(color="#000000", width=1, dash="dash"), row=1, col=col)
        fig.add_annotation(x=even, y=0.02, text="even mix", showarrow=False, xanchor="left", yanchor="bottom",
                           xshift=4, row=1, col=col)
        fig.add_hline(y=KEEP, line=dict(color="#999999", width=1, dash="dot"), row=1, col=col,
                      annotation_text=f"{KEEP:.0%} of the original", annotation_position="bottom right")
    fig.update_xaxes(title_text=f"share of {TASK} in the calibration", tickformat=".0%", range=[-0.03, 1.03])
    fig.update_yaxes(range=[0, 1.05])
    fig.update_yaxes(title_text="fraction of the original's accuracy", col=1)
    fig.update_layout(title=f"{model_name}: the calibration mix decides what survives", template="plotly_white",
                      width=1000, height=430, margin=dict(t=70, b=50, l=60, r=20),
                      legend=dict(orientation="h", x=0.5, xanchor="center", y=-0.2))
    return fig


def screenshot(fig, png: Path) -> None:
    """The figure as a PNG, through headless Chromium (kaleido is not a dependency)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "figure.html"
        fig.write_html(html, include_plotlyjs=True, full_html=True, config=dict(displayModeBar=False))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_page(viewport=dict(width=fig.layout.width, height=fig.layout.height))
            page.goto(html.as_uri())
            page.wait_for_selector(".main-svg")
            page.screenshot(path=str(png))
            browser.close()


def parse_shares(spec: str) -> list[float]:
    """Shares of the task, comma-separated: numbers or LO:HI:STEP ranges (both ends included),
    as `0:1:0.1,0.95,0.99`; the even mix is always added."""
    shares = [1 / len(DOMAINS)]
    for part in spec.split(","):
        if ":" in part:
            lo, hi, step = (float(x) for x in part.split(":"))
            shares += [lo + i * step for i in range(round((hi - lo) / step) + 1)]
        else:
            shares.append(float(part))
    return sorted({round(s, 4) for s in shares})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=demo_names(), default="demo-fine")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--methods", default="mone,reap", help="comma-separated; each in its default mode")
    parser.add_argument("--shares", default="0:1:0.1,0.95,0.97,0.98,0.99,0.995",
                        help="shares of arithmetic: numbers and LO:HI:STEP ranges, comma-separated")
    parser.add_argument("--samples", type=int, default=256, help="calibration sequences per domain")
    parser.add_argument("--task-examples", type=int, default=200, help="items per demo task")
    parser.add_argument("--heldout", type=int, default=32, help="held-out sequences per source, for KL")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="moeviz-mix-")))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "mix-fine.png"), help="PNG path; '' for none")
    args = parser.parse_args()
    torch.set_num_threads(2)
    begin = time.perf_counter()

    model, tokenizer = load_model(args.model, device="cpu")
    fingerprint = model_fingerprint(model)
    stats = domain_stats(model, tokenizer, args.samples, args.cache)
    rest = ExpertStats.mix([(stats[d], 1.0) for d in OTHERS])
    sources = {TASK: stats[TASK], "rest": rest}
    data = {TASK: f"demo:{TASK}", "rest": "demo:" + ",".join(OTHERS)}
    shares, even, n = parse_shares(args.shares), 1 / len(DOMAINS), args.task_examples
    original = task_accuracies(model, tokenizer, n=n)

    results, raw = {}, {}
    for method in args.methods.split(","):
        start = time.perf_counter()
        progress = lambda step, done, total: print(f"{method}: {step} ({done}/{total})", file=sys.stderr)  # noqa: E731
        raw[method] = mix_tradeoff(model, tokenizer, sources, PlanConfig(method, ratio=args.ratio), shares, data,
                                   num_samples=args.heldout, tasks=True, task_examples=n,
                                   fingerprint=fingerprint, progress=progress)
        results[method] = [summarise(row, original, n) for row in raw[method]]
        print(f"{method}: {len(shares)} mixes in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        print(markdown(method, results[method], even) + "\n", flush=True)

    summary = {m: dict(even=next(r for r in rows if math.isclose(r["share"], even)), best=best_mix(rows))
               for m, rows in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(model=args.model, ratio=args.ratio, shares=shares, even_share=even, task=TASK, others=OTHERS,
                  calibration=dict(samples=args.samples, seq_len=128), task_examples=n, heldout=args.heldout,
                  held_out_sources=data, original=original, results=results, summary=summary,
                  pruned={m: {r["share"]: r["pruned"] for r in rows} for m, rows in raw.items()},
                  seconds=time.perf_counter() - begin)
    (args.out / "mix.json").write_text(json.dumps(report, indent=1))
    for method, s in summary.items():
        best = s["best"]
        print(f"{method}: even mix {TASK} {s['even']['task']:.2f}, other four {s['even']['rest_mean']:.2f}; "
              + (f"best mix (share {best['share']:g}) {TASK} {best['task']:.2f}, other four {best['rest_mean']:.2f}"
                 if best else f"no share keeps {TASK} at {KEEP} of the original"))
    if args.figure:
        screenshot(figure(results, even, args.ratio, args.model), Path(args.figure))
        print(f"figure: {args.figure}", file=sys.stderr)
    print(f"{args.out / 'mix.json'} ({time.perf_counter() - begin:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
