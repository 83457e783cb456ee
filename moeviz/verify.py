"""`moeviz verify`: an export checked where it will be served.

First the files, with no engine and no weights read: every file the index names is there, every
tensor the config promises is there with its shape (a dry run of the load on the meta device),
each MoE layer holds exactly the experts its plan keeps, every replacement vector exists, and
every file's checksum matches the one the export wrote into the lineage. A broken copy is named
in one line before any model is built.

Then an engine (stock transformers, vLLM through its offline API, or `moeviz.load_model`, run
by `moeviz/engine.py` in this Python or another one) continues a few held-out prompts greedily,
and its tokens and log-probabilities are compared with moeviz's intended model: the plan applied
in place on the original the lineage names, or `moeviz.load_model` of the export when the
original is not at hand (the result says which). The result goes into the lineage and the card.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from .adapters import get_adapter
from .building import skeleton
from .card import with_verification
from .checkpoint import Checkpoint, _header, demo_names, fingerprint, local_dir, parse_expert_key, read_config
from .export import CARD_FILE, file_checksums, write_atomically
from .plan import LINEAGE_FILE, MOEVIZ_ONLY, PLAN_FILE, SUBSTITUTION, PruningPlan
from .reload import ExportLayout, is_pruned_export, read_substitution
from .rewrite import INDEX_FILE

ENGINES = ("transformers", "vllm", "moeviz")
ENGINE_SCRIPT = Path(__file__).with_name("engine.py")
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.15}  # nats of log-probability
VLLM_CPU = dict(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0")


class VerifyError(ValueError):
    """The export cannot be verified as asked (no engine there, no prompts to give it)."""


# ---- the files ------------------------------------------------------------------------------
def check_files(path) -> list[str]:
    """What is wrong with an export's files, one line each (empty: nothing found)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return [f"{path} holds no config.json: not a checkpoint directory (or a copy that lost it)."]
    lineage = read_lineage(path)
    manifest = (lineage or {}).get("files") or {}
    missing = sorted({name for name in manifest if not (path / name).is_file()} | _unindexed_files(path))
    if missing:  # nothing further can be read
        return [f"{name} is missing: {_missing_why(path, name, manifest)}" for name in missing]
    problems = _index(path) or _structure(path, lineage)
    for name, got in file_checksums(path, list(manifest)).items() if manifest else ():
        if got != (want := manifest[name]):
            problems.append(f"{name} differs from the file the export wrote ({want['bytes']:,} bytes, sha256 "
                            f"{want['sha256'][:12]}…; now {got['bytes']:,} bytes, {got['sha256'][:12]}…): a broken "
                            "or edited copy; copy it again from the export")
    return problems


def read_lineage(path) -> dict | None:
    file = Path(path) / LINEAGE_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def _unindexed_files(path: Path) -> set[str]:
    """The files an index names that are not there."""
    index = path / INDEX_FILE
    if not index.is_file():
        return set()
    return {f for f in set(json.loads(index.read_text())["weight_map"].values()) if not (path / f).is_file()}


def _missing_why(path: Path, name: str, manifest: dict) -> str:
    if name in manifest:
        return f"the export wrote it ({manifest[name]['bytes']:,} bytes); copy it again from the export"
    return f"{INDEX_FILE} names tensors in it"


def _index(path: Path) -> list[str]:
    """The index and the files' headers agree: each tensor where the index says, none unlisted."""
    index = path / INDEX_FILE
    if not index.is_file():
        return []
    weight_map = json.loads(index.read_text())["weight_map"]
    headers = {file.name: _header(file) for file in sorted(path.glob("*.safetensors"))}
    problems = [f"{INDEX_FILE} puts {key} in {file}, which does not hold it" for key, file in weight_map.items()
                if key not in headers.get(file, {})]
    for file, header in headers.items():
        if extra := [k for k in header if weight_map.get(k) != file]:
            problems.append(f"{file} holds {len(extra)} tensor(s) {INDEX_FILE} does not list (e.g. {extra[0]}): "
                            "loaders would not read them")
    return problems


class _Shapes:
    """A `Checkpoint` whose tensors are empty meta tensors of the files' shapes and dtypes."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.file_of = ckpt, ckpt.file_of

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.empty(self.ckpt.shape(name), dtype=self.ckpt.dtype(name), device="meta")


def _structure(path: Path, lineage: dict | None) -> list[str]:
    """A dry run of `load_exported` on the meta device: the config's model, cut as the files
    say, and every file tensor put in its place, shapes compared; then what no file filled."""
    ckpt = Checkpoint(path)
    config = read_config(path)
    config = type(config).from_dict(config.to_dict())
    config.dtype = ckpt.main_dtype
    try:
        layout = ExportLayout(path, config)
    except ValueError as err:
        return [str(err)]
    for attr in ("quantization_config", "compression_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    absent = [(layer_idx, name) for layer_idx, (_, values) in layout.substituted.items()
              for name in values.values() if name and name not in ckpt.file_of]
    if absent:
        return [f"{len(absent)} replacement vector(s) of the expert substitution are not in the files ("
                f"{_layers(sorted({layer for layer, _ in absent}))}, e.g. {absent[0][1]}): copy the export again"]
    adapter = get_adapter(skeleton(config, str(path), ckpt.keys()))
    if mixed := _mixed_dtypes(ckpt, adapter):
        return mixed
    if lineage and (problems := _experts(path, ckpt, adapter, PruningPlan(**lineage["plan"]), lineage["kind"])):
        return problems  # a wrong count makes every tensor below look wrong
    try:
        layout.restructure(adapter)
        layout.bind(adapter)
    except ValueError as err:
        return [str(err)]
    problems, written, shapes = [], Counter(), _Shapes(ckpt)
    for key in ckpt.keys():
        try:
            pairs = layout.fill(shapes, key)
        except ValueError as err:
            problems.append(str(err))
            continue
        for target, value in pairs:
            if tuple(target.shape) != tuple(value.shape):
                problems.append(f"{key} is {list(value.shape)} in {ckpt.file_of[key].name}; the config makes it "
                                f"{list(target.shape)}")
            written[id(target if target._base is None else target._base)] += target.numel()
    model = adapter.model
    transient = {name for name, _ in model.named_non_persistent_buffers()}
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n not in transient)]
    if lost := [name for name, t in tensors if written[id(t)] < t.numel()]:
        problems.append(f"The files lack {len(lost)} tensor(s) the config promises, e.g. {', '.join(lost[:3])}")
    return problems


def _mixed_dtypes(ckpt: Checkpoint, adapter) -> list[str]:
    """The experts of a layer hold each tensor in one dtype: another betrays a replaced tensor."""
    layers = {layer.layer_idx: layer for layer in adapter.layers}
    dtypes: dict[tuple[int, str], set[str]] = {}
    for key in ckpt.keys():
        ek = parse_expert_key(key, layers)
        if ek is not None and ek.expert_idx is not None and ek.name != "approx_value":
            dtypes.setdefault((ek.layer_idx, ek.name), set()).add(ckpt.info(key)["dtype"])
    return [f"layer {layer}: its experts' {name} come in {len(found)} dtypes ({', '.join(sorted(found))}): one was "
            "replaced by another tensor" for (layer, name), found in dtypes.items() if len(found) > 1]


def _experts(path: Path, ckpt: Checkpoint, adapter, plan: PruningPlan, kind: str) -> list[str]:
    """Each MoE layer holds exactly the experts its plan keeps, under the ids its kind gives
    them, and the config counts them so; every substituted expert has its vector."""
    original = dict(zip(plan.model.get("layer_indices") or [], plan.model.get("num_experts") or []))
    layers = {layer.layer_idx: layer for layer in adapter.layers}
    held: dict[int, set[int]] = {}  # the expert ids of per-expert keys
    fused: dict[int, set[int]] = {}  # the first dimension of fused (E, …) tensors: a count, not ids
    for key in ckpt.keys():
        ek = parse_expert_key(key, layers)
        if ek is not None and ek.expert_idx is not None and ek.name != "approx_value":
            held.setdefault(ek.layer_idx, set()).add(ek.expert_idx)
        elif ek is not None and ek.expert_idx is None and len(ckpt.shape(key)) >= 2:  # not a router's (E,) bias
            fused.setdefault(ek.layer_idx, set()).add(ckpt.shape(key)[0])
    substituted = read_substitution(json.loads((path / "config.json").read_text()))
    stored_plan = PruningPlan.load(path / PLAN_FILE) if (path / PLAN_FILE).is_file() else None
    problems, miscounted = [], {}
    if kind == MOEVIZ_ONLY and (stored_plan is None or stored_plan.pruned != plan.pruned):
        problems.append(f"{PLAN_FILE} is {'missing' if stored_plan is None else 'not the plan the lineage records'}: "
                        "moeviz cannot tell which experts the files hold")
    for layer_idx, layer in layers.items():
        n = original.get(layer_idx, layer.num_experts)
        kept = plan.kept(layer_idx, n)
        if kind == SUBSTITUTION:
            counted, ids = n, set(kept)
            values = substituted.get(layer_idx, (None, {}))[1]
            if set(values) != set(plan.pruned.get(layer_idx, ())):
                problems.append(f"layer {layer_idx}: the config substitutes experts {sorted(values)}, the plan prunes "
                                f"{plan.pruned.get(layer_idx, [])}")
        else:
            counted, ids = (n if kind == MOEVIZ_ONLY else len(kept)), set(range(len(kept)))
        if layer.num_experts != counted:
            miscounted.setdefault((layer.num_experts, counted), []).append(layer_idx)
        elif layer_idx in held and held[layer_idx] != ids:  # (a layout of its own, Aria's `fc1`: the dry run checks it)
            found = held[layer_idx]
            problems.append(f"layer {layer_idx}: the files hold {len(found)} experts ({_ids(found - ids, 'extra')}"
                            f"{_ids(ids - found, 'missing')}); its plan keeps {len(kept)}")
        elif layer_idx in fused and fused[layer_idx] != {len(kept)}:
            problems.append(f"layer {layer_idx}: the files' fused expert tensors hold {sorted(fused[layer_idx])} "
                            f"experts; its plan keeps {len(kept)}")
    for (says, counted), where in miscounted.items():  # one line for every layer miscounted alike
        problems.insert(0, f"config.json gives {says} experts a layer, the plan makes it {counted} in "
                           f"{_layers(where)} ({kind} export): the config was edited or is another model's")
    return problems


def _layers(indices: list[int]) -> str:
    return f"layer {indices[0]}" if len(indices) == 1 else f"layers {indices[0]}–{indices[-1]} ({len(indices)})"


def _ids(ids: set[int], what: str) -> str:
    return f"{what}: {sorted(ids)[:8]}{'…' if len(ids) > 8 else ''} " if ids else ""


# ---- an engine against moeviz's intended model ------------------------------------------------
@dataclass
class Verification:
    engine: str
    version: str | None
    device: str
    reference: str  # what the engine was compared with
    rows: list[dict] = field(default_factory=list)  # per prompt: tokens equal, largest difference
    tolerance: float = 0.0
    error: str | None = None  # the engine's refusal, with what to do

    @property
    def ok(self) -> bool:
        return self.error is None and all(r["equal"] and r["diff"] <= self.tolerance for r in self.rows)

    def summary(self) -> str:
        where = f"{_ENGINE_NAMES[self.engine]} {self.version or ''}".strip() + f" ({self.device})"
        if self.error:
            return f"Refused by {where} on {date.today()}: {self.error}"
        equal = sum(r["equal"] for r in self.rows)
        diff = max((r["diff"] for r in self.rows), default=0.0)
        verdict = "Verified" if self.ok else "Differs"
        return (f"{verdict} in {where} on {date.today()}: {equal}/{len(self.rows)} prompts equal, largest log-prob "
                f"difference {diff:.2g} (tolerance {self.tolerance:g}), against {self.reference}")


_ENGINE_NAMES = dict(transformers="transformers", vllm="vLLM", moeviz="moeviz.load_model")


def default_engine(path) -> str:
    """The engine that serves this kind of export: stock transformers a standard one, moeviz the rest."""
    return "moeviz" if is_pruned_export(path) else "transformers"


def verify(path, engine: str | None = None, python: str | None = None, data: str | None = None,
           num_prompts: int = 5, prompt_tokens: int = 32, new_tokens: int = 16, device: str = "auto",
           tolerance: float | None = None, model=None, progress=None) -> Verification:
    """Run `engine` on the export at `path` and compare it with moeviz's intended model (see the
    module's docstring); `model`, when given, is the original already loaded (the dashboard's
    backend holds it). The files are checked first: `VerifyError` lists what is wrong."""
    say = progress or (lambda text: None)
    path = Path(path).expanduser().resolve()
    say("Checking the files and their checksums")
    if problems := check_files(path):
        raise VerifyError("\n".join(problems))
    lineage = read_lineage(path) or {}
    if "files" not in lineage:
        say("No checksums in the lineage (not moeviz's export, or written before moeviz kept them): the files "
            "were checked against their config" + (" and plan" if lineage else "") + " only")
    engine = engine or default_engine(path)
    if engine not in ENGINES:
        raise VerifyError(f"Unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    prompts = held_out_prompts(path, lineage, data, num_prompts, prompt_tokens)
    say(f"The intended model: {num_prompts} prompts of {prompt_tokens} tokens, {new_tokens} more each")
    reference, how, dtype = intended(path, lineage, prompts, new_tokens, device, model)
    say(f"{_ENGINE_NAMES[engine]} on the export")
    got = run_engine(path, engine, prompts, new_tokens, python, device, str(dtype).removeprefix("torch."))
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, 0.15)
    result = Verification(engine, got.get("version"), got.get("device", "?"), how, tolerance=tol)
    if "error" in got:
        result.error = explain_refusal(path, engine, got)
    else:
        result.rows = compare(prompts, reference, got, tol)
    record(path, result)
    return result


def held_out_prompts(path: Path, lineage: dict, data: str | None, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens from the held-out split of `data`, by default the text the
    plan was calibrated on (the export's own tokenizer turns it into tokens)."""
    from .data import sample_sequences

    config = json.loads((path / "config.json").read_text())
    data = data or _calibration_data(lineage)
    if data is None:
        raise VerifyError("Name the prompts' text with --data: the plan's calibration is not at hand to say which.")
    tokenizer = None
    if any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return sample_sequences(data, n, length, tokenizer, 4321, split="heldout", vocab_size=vocab).tolist()


def _calibration_data(lineage: dict) -> str | None:
    from .stats import plan_stats

    plan = PruningPlan(**lineage["plan"]) if lineage.get("plan") else None
    try:
        stats = plan_stats(plan) if plan else None
    except (FileNotFoundError, ValueError, OSError):
        stats = None
    if stats is not None:
        calibration = stats.meta.get("calibration") or {}
        return (calibration[0] if isinstance(calibration, list) else calibration).get("data")
    return "demo" if lineage.get("parent") in demo_names() else None


def intended(path: Path, lineage: dict, prompts, new_tokens: int, device: str, model=None):
    """(greedy result, how it was made, dtype) of moeviz's intended model: the plan applied in
    place on the original, or else `moeviz.load_model` of the export itself."""
    from .apply import applied
    from .engine import greedy
    from .loading import load_model
    from .stats import plan_stats

    plan = PruningPlan(**lineage["plan"]) if lineage.get("plan") else None
    parent, why = lineage.get("parent"), None
    if plan is None:
        why = "it has no moeviz lineage"
    elif lineage.get("recovery"):
        why = "its weights were trained after pruning"
    elif model is None:
        try:
            if fingerprint(local_dir(parent)) != lineage.get("parent_fingerprint"):
                why = f"{parent} is not the checkpoint it was exported from (its fingerprint differs)"
        except (OSError, ValueError) as err:
            why = f"the original {parent} is not at hand ({type(err).__name__})"
    if why is None:
        try:
            stats = plan_stats(plan)
        except (FileNotFoundError, OSError, ValueError):
            stats = None
        own = model is None
        if own:
            model = load_model(parent, device=device)[0]
        try:
            with applied(model, plan, stats, lineage.get("parent_fingerprint")):
                result = greedy(model, prompts, new_tokens)
            return result, f"the plan applied in place on {parent}", next(model.parameters()).dtype
        except ValueError as err:  # the plan needs statistics that are not at hand
            why = f"the plan cannot be applied in place here ({err})"
        finally:
            if own:  # freed before the engine starts: the GPU is the engine's now
                del model
                _free()
    export = load_model(path, device=device)[0]
    result = greedy(export, prompts, new_tokens)
    dtype = next(export.parameters()).dtype
    del export
    _free()
    return result, f"moeviz.load_model of the export ({why})", dtype


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_engine(path: Path, engine: str, prompts, new_tokens: int, python: str | None = None,
               device: str = "auto", dtype: str | None = None) -> dict:
    """`moeviz/engine.py` in `python` (default this one): the engine's result, or its refusal.
    `dtype` is the intended model's, so that no engine casts a float32 checkpoint down."""
    request = dict(engine=engine, path=str(path), prompts=prompts, new_tokens=new_tokens, dtype=dtype,
                   device=None if device == "auto" else device)
    env = {**VLLM_CPU, **os.environ} if engine == "vllm" else dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        ask, answer = Path(tmp) / "request.json", Path(tmp) / "result.json"
        ask.write_text(json.dumps(request))
        run = subprocess.run([python or sys.executable, str(ENGINE_SCRIPT), str(ask), str(answer)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not answer.is_file():
            last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
            raise VerifyError(f"{engine} could not be run by {python or sys.executable}: {last}")
        return json.loads(answer.read_text())


def explain_refusal(path: Path, engine: str, got: dict) -> str:
    """The engine's own message and what to do about it."""
    said, version = got["error"], got.get("version")
    kind = (read_lineage(path) or {}).get("kind")
    config = json.loads((path / "config.json").read_text())
    if engine == "vllm" and version is None:
        advice = "vLLM is not installed there: name its Python with --python (see bench/serve.py)"
    elif config.get("model_type") == "moeviz_pruned":
        advice = "a moeviz-only export loads in moeviz alone: verify it with --engine moeviz"
    elif kind == SUBSTITUTION and engine == "vllm":
        advice = (f"vLLM {version} has no expert substitution: use ≥ 0.33, or export with `--mode remove` for a "
                  "standard checkpoint")
    elif kind == SUBSTITUTION:
        advice = ("stock transformers cannot load an expert substitution: verify with --engine vllm (≥ 0.33) or "
                  "--engine moeviz, or export with `--mode remove` for a standard checkpoint")
    else:
        advice = "the engine cannot read this checkpoint"
    return f"{said.splitlines()[0][:400]} — {advice}"


def compare(prompts, reference: dict, got: dict, tolerance: float) -> list[dict]:
    """Per prompt: whether the engine's greedy tokens are the intended model's (a differing
    token counts as equal where the intended model's top two lie within `tolerance`: a tie),
    and the largest log-probability difference over the tokens both share."""
    rows = []
    for i, prompt in enumerate(prompts):
        mine, theirs = reference["tokens"][i], got["tokens"][i]
        same = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        tie = same < len(mine) and reference["margins"][i][same] <= tolerance
        shared = len(prompt) - 1 + same
        diffs = [abs(a - b) for a, b in zip(reference["logprobs"][i][:shared], got["logprobs"][i][:shared])]
        rows.append(dict(equal=same == len(mine) == len(theirs) or tie, first_difference=None if same == len(mine)
                         else same, diff=max(diffs, default=0.0)))
    return rows


# ---- the result, kept with the export ---------------------------------------------------------
def record(path: Path, result: Verification) -> None:
    """The result in the lineage (one entry an engine, the latest) and in the card's Verification section."""
    lineage = read_lineage(path)
    if lineage is None:
        return  # not moeviz's export: nothing of moeviz's to update
    lineage.setdefault("verifications", {})[result.engine] = dict(
        asdict(result), summary=result.summary(), ok=result.ok, date=date.today().isoformat())
    write_atomically(path / LINEAGE_FILE, json.dumps(lineage, indent=2))
    card = path / CARD_FILE
    if card.is_file():
        lines = [v["summary"] for v in lineage["verifications"].values()]
        write_atomically(card, with_verification(card.read_text(), lines))
