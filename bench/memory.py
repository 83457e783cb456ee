"""Peak memory of the command line and of the dashboard, as a multiple of the checkpoint's size.

    python bench/memory.py [--small] [--arch qwen3_moe|olmoe|mixtral|qwen3_5_moe_text] [--dir DIR] [--app] [--skip-cli]

Builds once (cached in --dir, default /tmp/moeviz-bench/<arch>[-small]; delete it to rebuild) a
random bf16 MoE checkpoint in ~6 safetensors shards, with no tokenizer: 8 layers, 64 experts,
top-8, hidden 1024 (1.66 GiB), or with --small 4 layers, hidden 768 (394 MiB). `qwen3_5_moe_text`
(Qwen3.5-MoE's text decoder, 2026) keeps Qwen3.5-35B-A3B's own layer shapes (hidden 2048, experts
512 wide, top-8, a shared expert 512 wide, 16 query heads of 256 and 2 K/V heads, gated-DeltaNet
linear attention with 16 key and 32 value heads of 128, three linear-attention layers to one full
one) with 64 of its 256 experts, 8 of its 40 layers and a 32,000-token vocabulary (3.77 GiB);
--small: 4 layers, hidden 1024, experts 256 wide, half the heads. Then runs each
command of COMMANDS in its own process, sampling every 50 ms the anonymous resident memory
(RssAnon) of the process and all its descendants. The table gives each peak above the baseline
(the same peak for `python -c "import moeviz, torch, transformers"`) in MiB and as a multiple of
the checkpoint's bytes, and the wall time. With --app it also starts the Streamlit dashboard on
the checkpoint, opens every page in headless Chromium, reports the peak of the Streamlit process
alone (target <= 0.1x) and of its whole tree, stops it with SIGINT and lists (then kills) every
process of its tree still alive 10 s later. Progress and failures go to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

EVAL_DATA = "--data random --samples 16 --seq-len 128 --tasks none"  # throughput is off by default
# (row name, `moeviz` arguments, name under which its last stdout line is kept). The arguments
# are filled in with {model}, {tmp} and the kept outputs of the commands before.
COMMANDS = [
    ("info", "info --model {model}", None),
    ("calibrate", "calibrate --model {model} --data random --samples 16 --seq-len 128 --device cpu "
                  "--cache-dir {tmp}/cache", "stats"),
    ("calibrate --layer-by-layer", "calibrate --model {model} --data random --samples 16 --seq-len 128 --device cpu "
                                   "--cache-dir {tmp}/cache-layers --layer-by-layer", None),
    ("plan frequency", "plan --stats {stats} --method frequency --ratio 0.25 --out {tmp}/remove.json", "remove"),
    ("plan mone", "plan --stats {stats} --method mone --ratio 0.25 --out {tmp}/novice.json", "novice"),
    ("plan moe_pruner", "plan --stats {stats} --method moe_pruner --ratio 0.25 --out {tmp}/sparse.json", "sparse"),
    ("evaluate remove", "evaluate --model {model} --plan {remove} --stats {stats} " + EVAL_DATA, None),
    ("evaluate novice", "evaluate --model {model} --plan {novice} --stats {stats} " + EVAL_DATA, None),
    ("evaluate sparse", "evaluate --model {model} --plan {sparse} --stats {stats} " + EVAL_DATA, None),
    ("prune remove", "prune --model {model} --plan {remove} --stats {stats} --out {tmp}/pruned", None),
    ("prune novice", "prune --model {model} --plan {novice} --stats {stats} --out {tmp}/pruned-novice", None),
    ("prune sparse", "prune --model {model} --plan {sparse} --stats {stats} --out {tmp}/pruned-sparse", None),
]
PAGES = ["Overview", "Calibrate", "Experts", "Similarity", "Layers", "Prune", "Compare"]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Per family: the config keys of the number of experts and of an expert's intermediate size.
ARCHS = {"qwen3_moe": ("num_experts", "moe_intermediate_size"), "olmoe": ("num_experts", "intermediate_size"),
         "mixtral": ("num_local_experts", "intermediate_size"),
         "qwen3_5_moe_text": ("num_experts", "moe_intermediate_size")}
SIZES = {"full": dict(num_hidden_layers=8, hidden_size=1024, num_attention_heads=16, expert_size=512),
         "small": dict(num_hidden_layers=4, hidden_size=768, num_attention_heads=12, expert_size=256)}
_QWEN3_5_LAYERS = ["linear_attention"] * 3 + ["full_attention"]  # Qwen3.5-MoE's pattern, repeated
# Per family and size, the keys that replace SIZES' and build_checkpoint's common ones.
ARCH_SIZES = {
    "qwen3_5_moe_text": {
        "full": dict(hidden_size=2048, num_attention_heads=16, head_dim=256, num_key_value_heads=2,
                     linear_num_key_heads=16, linear_num_value_heads=32, shared_expert_intermediate_size=512,
                     layer_types=_QWEN3_5_LAYERS * 2),
        "small": dict(hidden_size=1024, num_attention_heads=8, head_dim=256, num_key_value_heads=2,
                      linear_num_key_heads=8, linear_num_value_heads=16, shared_expert_intermediate_size=256,
                      layer_types=_QWEN3_5_LAYERS),
    },
}


def build_checkpoint(path: Path, arch: str, size: str) -> None:
    """A random bf16 checkpoint (std 0.02) in ~6 shards, built on the meta device: no float32 copy."""
    experts_key, expert_size_key = ARCHS[arch]
    dims = dict(vocab_size=32000, head_dim=64, num_key_value_heads=4, num_experts_per_tok=8,
                max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, **SIZES[size])
    dims.update(ARCH_SIZES.get(arch, {}).get(size, {}))
    config = AutoConfig.for_model(arch, **{experts_key: 64, expert_size_key: dims.pop("expert_size")}, **dims)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
        for buf in model.buffers():  # score-correction biases; the rotary tables are not saved
            if buf.is_floating_point():
                buf.zero_()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial, max_shard_size=int(total / 5))  # shards pack unevenly: 5 gives ~6
    partial.rename(path)  # a half-written checkpoint is never taken for a cached one


def stat(pid: int) -> tuple[int, str] | None:
    """(ppid, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        return int(fields[1]), fields[19]
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> dict[int, str]:
    """pid → start time of `root` and all its descendants, found through their ppid links."""
    table = {int(e.name): stat(int(e.name)) for e in os.scandir("/proc") if e.name.isdigit()}
    table = {pid: row for pid, row in table.items() if row}
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return {pid: table[pid][1] for pid in tree if pid in table}


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


class TreeSampler:
    """Peak RssAnon of a process and of its process tree, sampled every 50 ms in a thread."""

    def __init__(self, root: int):
        self.root, self.peak_root, self.peak_tree, self.peak_backend = root, 0, 0, 0
        self.seen: dict[int, str] = {}  # every pid ever in the tree → its start time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            tree = process_tree(self.root)
            self.seen.update(tree)
            self.peak_root = max(self.peak_root, rss_anon(self.root))
            self.peak_tree = max(self.peak_tree, sum(rss_anon(pid) for pid in tree))
            backend = sum(rss_anon(pid) for pid in tree if "moeviz.cli serve" in _cmdline(pid))
            self.peak_backend = max(self.peak_backend, backend)
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Result:
    name: str
    peak: int  # bytes of RssAnon
    wall: float  # seconds
    ok: bool = True
    stdout: str = ""
    stderr: str = ""


def measure(name: str, argv: list[str], cwd: Path) -> Result:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate()
    return Result(name, sampler.peak_tree, time.perf_counter() - start, proc.returncode == 0, stdout, stderr)


def run_commands(model: Path, tmp: Path) -> list[Result]:
    values, results = {"model": str(model), "tmp": str(tmp)}, []
    for name, args, keep in COMMANDS:
        try:
            args = args.format(**values)
        except KeyError as missing:
            print(f"{name}: SKIPPED, no {missing} (an earlier command failed)", file=sys.stderr)
            results.append(Result(name, 0, 0.0, ok=False))
            continue
        result = measure(name, [sys.executable, "-m", "moeviz.cli", *shlex.split(args)], tmp)
        results.append(result)
        print(f"{name}: {result.peak / MiB:.0f} MiB, {result.wall:.1f} s", file=sys.stderr)
        if not result.ok:
            tail = "\n    ".join(result.stderr.strip().splitlines()[-8:])
            print(f"  FAILED: moeviz {args}\n    {tail}", file=sys.stderr)
        elif keep and result.stdout.strip():
            values[keep] = result.stdout.strip().splitlines()[-1]
    return results


def start_app(model: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
            "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--", "--model", str(model)]  # no reruns on others' edits
    with open(tmp / "streamlit.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "MOEVIZ_CACHE_DIR": str(tmp / "app-cache")},
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"streamlit did not start:\n{(tmp / 'streamlit.log').read_text()[-2000:]}")


def open_pages(page, model: Path, sampler: TreeSampler) -> None:
    """Click every sidebar link in turn, waiting for each page's script to finish."""
    from playwright.sync_api import Error

    for title in PAGES:
        link = page.get_by_role("link", name=title, exact=True)
        if not link.count():
            print(f"page {title}: no link in the sidebar", file=sys.stderr)
            continue
        start = time.perf_counter()
        try:
            link.first.click()
            page.get_by_role("heading", name=title).first.wait_for(timeout=300_000)
            page.wait_for_selector(IDLE, timeout=300_000)
        except Error as err:
            print(f"page {title}: {str(err).splitlines()[0]}", file=sys.stderr)
        errors = page.locator("[data-testid='stException'], [data-testid='stAlertContentError']").count()
        print(f"page {title}: {time.perf_counter() - start:.1f} s, peak RssAnon so far: streamlit "
              f"{sampler.peak_root / MiB:.0f} MiB, tree {sampler.peak_tree / MiB:.0f} MiB"
              + (f", {errors} error(s) shown" if errors else ""), file=sys.stderr)
        if title == "Overview" and str(model) not in page.locator("[data-testid='stMain']").inner_text():
            print("  WARNING: the Overview does not name --model: the app is on another model", file=sys.stderr)


def evaluate_twice(page, url: str, model: Path, sampler: TreeSampler) -> None:
    """Calibrate on random tokens, then "Apply and evaluate" two plans from the Prune page (the
    second in a new browser session): the model's backend should load the weights once."""
    page.get_by_role("link", name="Calibrate", exact=True).click()
    page.wait_for_selector(IDLE, timeout=300_000)
    page.get_by_role("combobox", name="Text").click()
    page.get_by_role("option", name="random", exact=True).click()
    page.wait_for_selector(IDLE, timeout=300_000)
    page.get_by_label("Sequences").fill("8")
    page.get_by_label("Sequences").press("Enter")
    page.wait_for_selector(IDLE, timeout=300_000)
    page.get_by_role("button", name="Calibrate").click()
    page.get_by_text("Calibrated").wait_for(timeout=600_000)
    print(f"calibrated: tree {sampler.peak_tree / MiB:.0f} MiB", file=sys.stderr)
    for ratio in ("0.25", "0.5"):
        page.goto(f"{url}/prune?model={model}&prune_method=frequency&prune_ratio={ratio}&eval_samples=8")
        page.wait_for_selector(IDLE, timeout=300_000)
        page.get_by_role("button", name="Apply and evaluate").click()
        page.get_by_text("Evaluated as run").wait_for(timeout=900_000)
        print(f"evaluated at {ratio}: tree {sampler.peak_tree / MiB:.0f} MiB", file=sys.stderr)
    backends = {pid for pid in sampler.seen if "moeviz.cli serve" in _cmdline(pid)}
    print(f"backend processes seen: {len(backends)}", file=sys.stderr)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def browse(url: str, model: Path, sampler: TreeSampler) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector(IDLE, timeout=300_000)
        open_pages(page, model, sampler)
        sampler.pages_peak_root = sampler.peak_root
        evaluate_twice(page, url, model, sampler)
        browser.close()


def stop_app(proc: subprocess.Popen, seen: dict[int, str]) -> None:
    """SIGINT, then after 10 s report, and kill by pid, every process of its tree still alive."""
    seen = {**seen, **process_tree(proc.pid)}
    proc.send_signal(signal.SIGINT)
    time.sleep(10)
    proc.poll()  # reap it if it exited
    alive = [pid for pid, start in seen.items() if (stat(pid) or (0, None))[1] == start]
    for pid in alive:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            print(f"SURVIVOR 10 s after SIGINT: pid {pid}: {cmdline.strip()}", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
        except OSError:  # it ended meanwhile
            pass
    proc.wait()
    print(f"app stopped: {len(alive)} process(es) of its tree survived SIGINT", file=sys.stderr)


def measure_app(model: Path, tmp: Path) -> list[Result]:
    start = time.perf_counter()
    try:
        proc, url = start_app(model, tmp)
    except RuntimeError as err:
        print(f"app: FAILED: {err}", file=sys.stderr)
        return [Result("app", 0, 0.0, ok=False)]
    with TreeSampler(proc.pid) as sampler:
        try:
            browse(url, model, sampler)
        except Exception as err:  # report what was measured so far
            print(f"app: FAILED: {err}", file=sys.stderr)
        finally:  # even on Ctrl-C: never leave a server behind
            wall = time.perf_counter() - start
            stop_app(proc, dict(sampler.seen))
    return [Result("app: streamlit process, every page opened", getattr(sampler, "pages_peak_root", 0), wall),
            Result("app: streamlit process, also after two evaluations", sampler.peak_root, wall),
            Result("app: its backend (model loaded once), calibrate + two evaluations", sampler.peak_backend, wall)]


def print_table(results: list[Result], baseline: int, size: int) -> None:
    print(f"\ncheckpoint: {size / MiB:.0f} MiB of safetensors; baseline RssAnon "
          f"(python -c 'import moeviz, torch, transformers'): {baseline / MiB:.0f} MiB\n")
    print("| command | peak RssAnon above baseline (MiB) | × checkpoint | wall s |\n|---|---|---|---|")
    for r in results:
        above, failed = r.peak - baseline, "" if r.ok else " FAILED"
        figures = f"{above / MiB:.0f} | {above / size:.2f} | {r.wall:.1f}" if r.peak else " | | "
        print(f"| {r.name}{failed} | {figures} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="4 layers, smaller widths (qwen3_moe: 394 MiB), for quick runs")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen3_moe")
    parser.add_argument("--dir", type=Path, help="where the checkpoint is built once and cached")
    parser.add_argument("--app", action="store_true", help="also measure the dashboard")
    parser.add_argument("--skip-cli", action="store_true", help="only the baseline (and --app)")
    args = parser.parse_args()
    model = args.dir or Path("/tmp/moeviz-bench") / (args.arch.replace("_", "") + "-small" * args.small)
    if not (model / "config.json").is_file():
        print(f"building {model}…", file=sys.stderr)
        model.parent.mkdir(parents=True, exist_ok=True)
        build_checkpoint(model, args.arch, "small" if args.small else "full")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(prefix="moeviz-bench-") as tmp:
        baseline = measure("baseline", [sys.executable, "-c", "import moeviz, torch, transformers"], Path(tmp))
        results = [] if args.skip_cli else run_commands(model, Path(tmp))
        if args.app:
            results += measure_app(model, Path(tmp))
    print_table(results, baseline.peak, size)


if __name__ == "__main__":
    main()
