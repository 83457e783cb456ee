"""Cost of calibration: a plain forward pass against the same pass with the observer on.

    python bench/calibration.py [--repeats 5] [--samples 64] [--seq-len 128]

For the demo model and an OLMoE-like random model (8 layers, 64 experts, top-8, hidden 256)
it times, in one process, the model's own forward over the calibration batches, then the
same with the observer (probes off, then on), and prints the ratios and the peak memory.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from moeviz.adapters import get_adapter
from moeviz.calibrate import CalibConfig, observe
from moeviz.data import sample_sequences
from moeviz.loading import load_model, resolve_device
from moeviz.tiny import tiny_model

OLMOE_LIKE = dict(num_hidden_layers=8, num_experts=64, num_experts_per_tok=8, hidden_size=256,
                  intermediate_size=128, num_attention_heads=8, num_key_value_heads=8, head_dim=32,
                  vocab_size=1024)


class PeakMemory:
    """Peak resident memory (CPU, sampled every 2 ms) or peak allocated memory (CUDA), in MiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        page = 4096
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        self.mib = self.peak / 2**20


def plain_pass(model, tokens, batch_size):
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(name, model, tokens, batch_size, repeats):
    device = next(model.parameters()).device
    adapter = get_adapter(model)
    runs = {
        "plain forward": lambda: plain_pass(model, tokens, batch_size),
        "observer, probes off": lambda: observe(model, adapter, tokens, CalibConfig(batch_size=batch_size, probe_tokens=0)),
        "observer, probes 256": lambda: observe(model, adapter, tokens, CalibConfig(batch_size=batch_size, probe_tokens=256)),
    }
    peaks = {}
    for key, fn in runs.items():  # warm-up, and the peak memory (sampled in its own run)
        with PeakMemory(device) as mem:
            fn()
        peaks[key] = mem.mib
    times = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, so that drift hits every variant alike
        for key, fn in runs.items():
            times[key].append(timed(fn, device))
    base = min(times["plain forward"])
    print(f"\n{name}: {tokens.shape[0]} × {tokens.shape[1]} tokens, batch {batch_size}, {device}, "
          f"best of {repeats}")
    print(f"| run | seconds | × plain | peak memory MiB |")
    print(f"|---|---|---|---|")
    for key in runs:
        t = min(times[key])
        print(f"| {key} | {t:.3f} | {t / base:.2f} | {peaks[key]:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)

    model, tokenizer = load_model("demo", device=str(device))
    tokens = sample_sequences("demo", args.samples, args.seq_len, tokenizer)
    bench("demo model", model, tokens, args.batch_size, args.repeats)

    model = tiny_model("olmoe", **OLMOE_LIKE).to(device)
    tokens = sample_sequences("random", args.samples, args.seq_len, vocab_size=OLMOE_LIKE["vocab_size"])
    bench("OLMoE-like random model (8 layers, 64 experts, top-8, hidden 256)", model, tokens,
          args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
