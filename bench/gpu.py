"""moeviz on a GPU: calibration's cost against a plain forward, GPU memory beyond the weights,
host synchronisations, and the same statistics as on the CPU. One command:

    python bench/gpu.py --out results.json                # on a CUDA machine: ~15 GB checkpoint
    python bench/gpu.py --device cpu --tiny --out r.json  # the same code at toy size, in seconds

1. Builds once (in --dir, on local disk) a random bf16 checkpoint with Qwen3-30B-A3B's layer shape
   (hidden 2048, 128 experts of width 768, top-8, 32 query and 4 key-value heads of 128, vocab
   151,936) and 11 decoder layers: 15 GB. Loads it onto the device.
2. Times, warm and synchronised, the model's own forward and `observe` (calibration's pass, every
   statistic, probes off then on) over the same 16 × 2048 random tokens in batches of 8, best of
   --repeats: tokens/s and the ratio to the plain forward.
3. Host synchronisations of one batch, plain and observed: on CUDA those torch reports under
   `torch.cuda.set_sync_debug_mode`; everywhere, the aten operators that read a value back,
   counted by torch.profiler (bench/opcount.py), and the operators called per MoE layer.
4. Peak memory above what was allocated before (the weights), as a multiple of the checkpoint's
   bytes, for calibrate, evaluate with a plan in place, trace, a distillation of --distill-s
   seconds (the student loaded beside the teacher, its checkpoint not written back), and
   layer-by-layer calibration (the model not loaded). CUDA: `torch.cuda.max_memory_allocated`;
   CPU: resident memory sampled every 5 ms.
5. Exports a 25 % removal of the checkpoint (a standard one) and runs `moeviz verify` on it with
   stock transformers on --device (and vLLM, where it is importable), against the plan applied in
   place on the original: the export's and the verification's seconds, and the verdict.
6. Calibrates the shipped `demo-fine` on --device and on the CPU and compares every statistic:
   the counts exactly, the rest by the largest difference relative to the statistic's largest
   magnitude (tolerance 1e-4).

Prints one markdown table and writes every figure to --out. A section that fails is recorded
under "errors" and the others still run. Needs torch, transformers, safetensors and numpy
(scipy for the plan's methods); never streamlit, plotly, umap or datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # moeviz from this checkout, opcount beside this file

QWEN3_30B_A3B = dict(hidden_size=2048, num_experts=128, moe_intermediate_size=768, num_experts_per_tok=8,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                     intermediate_size=6144, norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, num_experts=8, moe_intermediate_size=32, num_experts_per_tok=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, intermediate_size=128, norm_topk_prob=True)
# Per size: decoder layers, sequences, tokens each, sequences per batch, probe tokens per layer.
SIZES = {"full": dict(layers=11, samples=16, seq_len=2048, batch_size=8, probes=256),
         "tiny": dict(layers=2, samples=4, seq_len=64, batch_size=2, probes=32)}
TOLERANCE = 1e-4  # CPU against GPU: |a − b| / max |b| per statistic


def build_checkpoint(path: Path, layers: int, dims: dict, device: torch.device) -> None:
    """A random bf16 Qwen3-MoE checkpoint (std 0.02), built on `device` (no float32 copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, max_position_embeddings=4096,
                                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                  pad_token_id=None, **dims)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="2GB")
    partial.rename(path)  # a half-written checkpoint is never taken for a built one


class ByteTokenizer:
    """A text's bytes as its token ids: `trace` needs a tokenizer; the random checkpoint has none."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode())]))

    def decode(self, ids) -> str:
        return bytes(ids).decode(errors="replace")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


@contextmanager
def peak_above(device: torch.device):
    """Yields a dict whose "bytes" is, afterwards, the peak memory above the start's."""
    out = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    stop, peak = threading.Event(), [0]

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    base = rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["bytes"] = max(peak[0], rss()) - base


class Bench:
    """Runs the sections in order; each records its figures in `results`, or its error."""

    def __init__(self, args):
        self.args, self.size = args, SIZES["tiny" if args.tiny else "full"]
        self.device = torch.device(args.device)
        self.results = dict(machine=machine(self.device), size="tiny" if args.tiny else "full", **self.size,
                            errors={})

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        print(f"{name}…", file=sys.stderr, flush=True)
        try:
            yield
        except Exception as err:  # record it, go on with the others
            self.results["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def checkpoint(self) -> Path:
        dims = TINY if self.args.tiny else QWEN3_30B_A3B
        path = Path(self.args.dir) / f"qwen3moe-{'tiny' if self.args.tiny else 'a3b'}-{self.size['layers']}l"
        if not (path / "config.json").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_checkpoint(path, self.size["layers"], dims, self.device)
        self.results["checkpoint_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        return path

    def tokens(self, vocab_size: int) -> torch.Tensor:
        from moeviz.data import sample_sequences

        return sample_sequences("random", self.size["samples"], self.size["seq_len"], vocab_size=vocab_size)

    def overhead(self, model, tokens: torch.Tensor) -> None:
        """Plain forward against calibration's pass, warm, best of --repeats, interleaved."""
        from moeviz.adapters import get_adapter
        from moeviz.calibrate import CalibConfig, observe

        adapter, bs, dev = get_adapter(model), self.size["batch_size"], self.device

        def plain():
            with torch.inference_mode():
                for batch in tokens.split(bs):
                    model(input_ids=batch.to(dev), use_cache=False)

        runs = {"plain": plain,
                "calibrate_probes_off": lambda: observe(model, adapter, tokens, CalibConfig(batch_size=bs, probe_tokens=0)),
                "calibrate_probes_on": lambda: observe(model, adapter, tokens,
                                                       CalibConfig(batch_size=bs, probe_tokens=self.size["probes"]))}
        for fn in runs.values():  # warm: kernels chosen, caches filled
            fn()
        times = {k: [] for k in runs}
        for _ in range(self.args.repeats):
            for key, fn in runs.items():
                times[key].append(best_time(fn, dev, 1))
        n = tokens.numel()
        for key, t in times.items():
            self.results[f"{key}_tokens_per_s"] = n / min(t)
            self.results[f"{key}_ratio"] = min(t) / min(times["plain"])

    def host_syncs(self, model, tokens: torch.Tensor) -> None:
        """One batch: host syncs torch reports (CUDA) and those the profiler counts; operators per layer."""
        from opcount import per_layer

        batch = tokens[:self.size["batch_size"]].to(self.device)
        counts = per_layer(model, batch, probe_tokens=self.size["probes"])
        for name in ("plain", "calibrate"):
            self.results[f"{name}_ops_per_layer"] = counts[name]["ops"]
            self.results[f"{name}_profiled_syncs_per_layer"] = counts[name]["syncs"]
            self.results[f"{name}_profiled_sync_ops"] = counts[name]["sync_ops"]
        if self.device.type != "cuda":
            return
        import warnings

        from moeviz.adapters import get_adapter
        from moeviz.calibrate import CalibConfig, observe

        adapter = get_adapter(model)
        passes = {"plain": lambda: model(input_ids=batch, use_cache=False),
                  "calibrate": lambda: observe(model, adapter, batch.cpu(), CalibConfig(
                      batch_size=len(batch), probe_tokens=self.size["probes"]))}
        for name, fn in passes.items():
            with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            where = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message)]
            self.results[f"{name}_cuda_syncs"] = len(where)
            self.results[f"{name}_cuda_sync_messages"] = sorted(set(where))[:10]

    def memory(self, model, tokenizer, path: Path, tokens: torch.Tensor) -> None:
        from moeviz.calibrate import CalibConfig, calibrate
        from moeviz.evaluate import EvalConfig, evaluate
        from moeviz.methods import PlanConfig, make_plan
        from moeviz.trace import trace

        ckpt, size = self.results["checkpoint_bytes"], self.size
        config = CalibConfig(data="random", num_samples=size["samples"], seq_len=size["seq_len"],
                             batch_size=size["batch_size"], probe_tokens=size["probes"])
        with self.section("memory: calibrate"), peak_above(self.device) as peak:
            stats, _ = calibrate(model, config, use_cache=False)
        self.results["memory_calibrate"] = peak.get("bytes", 0) / ckpt
        self.stats = stats  # the verification's plan, once the model is gone
        plan = make_plan(stats, PlanConfig("mone", ratio=0.25))
        eval_config = EvalConfig(data="random", num_samples=size["samples"], seq_len=size["seq_len"],
                                 batch_size=size["batch_size"])
        with self.section("memory: evaluate --plan"), peak_above(self.device) as peak:
            evaluate(model, eval_config, plan=plan, stats=stats)
        self.results["memory_evaluate_plan"] = peak.get("bytes", 0) / ckpt
        text = "".join(chr(97 + i % 26) for i in range(size["seq_len"] - 1))
        with self.section("memory: trace"), peak_above(self.device) as peak:
            trace(model, ByteTokenizer(), text, plan, stats)
        self.results["memory_trace"] = peak.get("bytes", 0) / ckpt
        with self.section("memory: distill"):
            self.distill_memory(model, path, stats, tokens)

    def distill_memory(self, teacher, path: Path, stats, tokens: torch.Tensor) -> None:
        """Export a 25 % removal, load it beside the teacher, distil it for --distill-s seconds."""
        from moeviz.export import export_plan
        from moeviz.loading import load_model
        from moeviz.methods import PlanConfig, make_plan
        from moeviz.recover import DistillConfig, distill

        plan = make_plan(stats, PlanConfig("frequency", ratio=0.25))
        with tempfile.TemporaryDirectory(prefix="moeviz-gpu-", dir=self.args.dir) as tmp:
            export_plan(str(path), plan, stats, Path(tmp) / "pruned")
            config = DistillConfig(steps=None, max_minutes=self.args.distill_s / 60, batch_size=self.size["batch_size"] // 2)
            with peak_above(self.device) as peak:
                student, _ = load_model(Path(tmp) / "pruned", device=str(self.device))
                report = distill(student, teacher, tokens, config, plan)
                del student
        self.results["memory_distill"] = peak.get("bytes", 0) / self.results["checkpoint_bytes"]
        self.results["distill_steps"] = report["steps"]

    def verify(self, path: Path) -> None:
        """A 25 % removal exported and verified where it is served, against the plan in place."""
        from importlib.util import find_spec

        from moeviz.export import export_plan
        from moeviz.methods import PlanConfig, make_plan
        from moeviz.verify import verify

        plan = make_plan(self.stats, PlanConfig("frequency", ratio=0.25))
        with tempfile.TemporaryDirectory(prefix="moeviz-gpu-", dir=self.args.dir) as tmp:
            start = time.perf_counter()
            export_plan(str(path), plan, self.stats, Path(tmp) / "pruned")
            self.results["export_s"] = time.perf_counter() - start
            for engine in ("transformers", "vllm") if find_spec("vllm") else ("transformers",):
                start = time.perf_counter()
                result = verify(Path(tmp) / "pruned", engine=engine, device=str(self.device))
                self.results[f"verify_{engine}_s"] = time.perf_counter() - start
                self.results[f"verify_{engine}"] = result.summary()
                self.results[f"verify_{engine}_ok"] = result.ok

    def layer_by_layer(self, path: Path) -> None:
        from moeviz.calibrate import CalibConfig, calibrate
        from moeviz.loading import load_skeleton

        size = self.size
        model = load_skeleton(str(path), with_files=True)
        config = CalibConfig(data="random", num_samples=size["samples"], seq_len=size["seq_len"],
                             batch_size=size["batch_size"], probe_tokens=size["probes"], layer_by_layer=True,
                             device=str(self.device))
        with peak_above(self.device) as peak:
            calibrate(model, config, use_cache=False)
        self.results["memory_layer_by_layer"] = peak.get("bytes", 0) / self.results["checkpoint_bytes"]

    def agreement(self) -> None:
        """demo-fine calibrated on the device and on the CPU: every statistic compared."""
        from moeviz.calibrate import CalibConfig, calibrate
        from moeviz.loading import load_model

        config = CalibConfig(data="demo", num_samples=32, seq_len=128, probe_tokens=64)
        stats = {}
        for dev in (str(self.device), "cpu"):
            model, tokenizer = load_model("demo-fine", device=dev)
            stats[dev] = calibrate(model, config, tokenizer, use_cache=False)[0]
        a, b = stats[str(self.device)], stats["cpu"]
        exact = ("count", "coactivation", "tokens")
        rows = {}
        for name in b.tensors:
            x, y = a[name].double(), b[name].double()
            if name in exact:
                rows[name] = dict(exact=True, differing=int((x != y).sum()), ok=bool(torch.equal(x, y)))
            else:
                err = float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))
                rows[name] = dict(exact=False, rel_err=err, ok=err <= TOLERANCE)
        self.results["agreement"] = rows
        self.results["agreement_ok"] = all(r["ok"] for r in rows.values())

    def run(self) -> dict:
        from moeviz.loading import load_model

        skip = set(self.args.skip)
        with self.section("checkpoint"):
            path = self.checkpoint()
            model, tokenizer = load_model(str(path), device=str(self.device))
            tokens = self.tokens(model.config.vocab_size)
            self.results["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        if "model" in locals():
            if "overhead" not in skip:
                with self.section("overhead"):
                    self.overhead(model, tokens)
            if "syncs" not in skip:
                with self.section("host syncs"):
                    self.host_syncs(model, tokens)
            if "memory" not in skip:
                self.memory(model, tokenizer, path, tokens)
            del model
        if "layer_by_layer" not in skip and "path" in locals():
            with self.section("memory: layer by layer"):
                self.layer_by_layer(path)
        if "verify" not in skip and hasattr(self, "stats"):  # the model gone: the device is the engine's
            with self.section("export and verify"):
                self.verify(path)
        if "agreement" not in skip:
            with self.section("CPU/device agreement"):
                self.agreement()
        return self.results


def machine(device: torch.device) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), device=str(device), gpu=gpu,
                cpus=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version())


def table(r: dict) -> str:
    """The figures as one markdown table; a missing figure is shown as –."""
    def f(key, fmt="{:.2f}"):
        return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "–"

    m = r["machine"]
    ok = r.get("agreement")
    worst = max((v["rel_err"] for v in ok.values() if not v["exact"]), default=None) if ok else None
    agree = "–" if not ok else ("yes" if r["agreement_ok"] else "NO") + (
        f" (counts exact: {all(v['ok'] for v in ok.values() if v['exact'])}, largest relative difference "
        f"{worst:.1e}, tolerance {TOLERANCE:g})")
    rows = [
        ("plain forward, tokens/s", f("plain_tokens_per_s", "{:,.0f}")),
        ("calibrate, probes off: tokens/s (× plain time)",
         f"{f('calibrate_probes_off_tokens_per_s', '{:,.0f}')} ({f('calibrate_probes_off_ratio')}×)"),
        (f"calibrate, {r['probes']} probe tokens/layer: tokens/s (× plain time)",
         f"{f('calibrate_probes_on_tokens_per_s', '{:,.0f}')} ({f('calibrate_probes_on_ratio')}×)"),
        ("aten operators per MoE layer, plain / calibrate",
         f"{f('plain_ops_per_layer', '{:.0f}')} / {f('calibrate_ops_per_layer', '{:.0f}')}"),
        ("host syncs per MoE layer (profiler), plain / calibrate",
         f"{f('plain_profiled_syncs_per_layer')} / {f('calibrate_profiled_syncs_per_layer')}"),
        ("host syncs per batch (CUDA sync debug), plain / calibrate",
         f"{f('plain_cuda_syncs', '{}')} / {f('calibrate_cuda_syncs', '{}')}"),
        ("peak memory above the weights, × checkpoint: calibrate", f("memory_calibrate")),
        ("… evaluate with a plan in place", f("memory_evaluate_plan")),
        ("… trace, with a plan", f("memory_trace")),
        (f"… distill (student beside the teacher, {f('distill_steps', '{}')} steps)", f("memory_distill")),
        ("peak memory, × checkpoint: calibrate layer by layer (model not loaded)", f("memory_layer_by_layer")),
        ("export of a 25 % removal, s", f("export_s", "{:.0f}")),
        *((f"moeviz verify in {e}, s: verdict", f"{f(f'verify_{e}_s', '{:.0f}')}: {r[f'verify_{e}']}")
          for e in ("transformers", "vllm") if f"verify_{e}" in r),
        ("demo-fine: statistics on the device equal the CPU's", agree),
    ]
    head = (f"{m['device']} ({m['gpu'] or 'CPU'}), {m['date']}, torch {m['torch']}, transformers {m['transformers']}; "
            f"checkpoint {r.get('checkpoint_bytes', 0) / 1e9:.2f} GB ({r['layers']} layers), "
            f"{r['samples']} × {r['seq_len']} tokens in batches of {r['batch_size']}")
    lines = [head, "", "| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    if r["errors"]:
        lines += ["", "errors: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-results.json", help="where every figure is written (JSON)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy model and few tokens: the code paths in seconds")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "moeviz-gpu"),
                        help="where the checkpoint is built once (local disk; 15 GB, or a few MB with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each pass (the best counts)")
    parser.add_argument("--distill-s", type=float, default=30.0, help="seconds of distillation")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("overhead", "syncs", "memory", "layer_by_layer", "verify", "agreement"))
    args = parser.parse_args()
    results = Bench(args).run()
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    sys.exit(1 if results["errors"] else 0)


if __name__ == "__main__":
    main()
