"""Recovery after pruning: a short fine-tuning of the pruned model against the original.

MoE-Pruner's expert-wise knowledge distillation (METHODS.md), for every kind of plan. The loss
is the next-token cross-entropy plus λ · Σ over MoE layers of the mean squared error between
each student expert's outputs and the same expert of the teacher on the same inputs, plus (by
default) the KL divergence of the logits to the teacher's. The squared error is divided by the
teacher's mean squared output in that layer, so that λ means the same for every model (an error
as large as the outputs weighs 1 per layer, as much as a cross-entropy of 1 nat). Experts are
matched by their original index, which the plan records: after a removal the student's expert j
is the teacher's `plan.kept(layer)[j]`, a novice stands for the teacher's pruned expert and
learns its mean output on the tokens routed to it, a merged expert is matched to the expert it
was merged into.

The teacher's expert outputs are exact and cheap: the student's experts are swapped, during
training, for a forward that also runs the teacher's experts (from the teacher's weights, with
no gradient) on the very tokens the student routed to them. The teacher's whole forward runs
only for the logits' KL (on by default: on the demo it keeps what pruning left intact, where
cross-entropy alone drifts to the training text; `logit_kl=0` skips it). Both models are held
in memory (the teacher in its own dtype, without gradients); a teacher too large to sit beside
the student is not streamed here.

For a removal or a merge the kept experts start equal to their teachers: the experts' term holds
them near the original while cross-entropy and the KL do the recovering; novices and sparsified
experts have a real target from the first step. Weights stored in bf16 or fp16 train through
float32 master copies (only the trained ones).

By default only what pruning touched trains: the experts (kept, novices, merged) of pruned
layers and their routers; with weight sparsity, every sparsified expert, whose zeroed weights
stay zero after every step. `DistillConfig(train_all=True)` trains every parameter.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from .adapters import execution_device, get_adapter
from .apply import model_info
from .checkpoint import Checkpoint, read_config, readable, scale_key
from .loading import load_model, model_fingerprint
from .moe_layer import MoELayer
from .plan import LINEAGE_FILE, PLAN_FILE, PlanError, PruningPlan, read_lineage
from .surgery import NoviceExperts

Progress = Callable[[int, int | None, dict], None]  # (step, steps if known, {"loss", "ce", "mse", "kl", "lr", "seconds"})


@dataclass(frozen=True)
class DistillConfig:
    steps: int | None = 200  # optimizer steps; None: until another budget ends
    max_tokens: int | None = None  # tokens seen, summed over steps
    max_minutes: float | None = None  # wall time of the training loop
    batch_size: int = 8  # sequences a step
    lr: float = 1e-4  # peak AdamW learning rate: warm-up, then cosine decay to a tenth over the budget
    warmup_steps: int = 10
    expert_mse: float = 1.0  # λ: weight of the experts' mean squared error
    logit_kl: float = 1.0  # weight of KL(teacher ‖ student) of the logits; 0 runs no teacher forward
    train_all: bool = False  # every parameter, not only what pruning touched
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (large students)
    seed: int = 0  # batch order

    def __post_init__(self):
        if self.steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ValueError("Give recovery a budget: steps, max_tokens or max_minutes.")
        for name in ("steps", "max_tokens", "max_minutes", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")


@dataclass
class _Pair:
    """A student MoE layer, the teacher's layer of the same index, and how experts match."""

    student: MoELayer
    teacher: MoELayer
    to_teacher: torch.Tensor  # router index → the teacher's expert (E_router,)
    to_inner: torch.Tensor  # router index → the student's expert in `student.experts`, −1 for a novice
    to_novice: torch.Tensor | None  # router index → its novice, −1 for a kept expert


def plan_of(model: PreTrainedModel) -> PruningPlan:
    """The plan a pruned checkpoint was made with (its `moeviz_plan.json`, or the lineage
    file `moeviz prune` writes beside a plain checkpoint)."""
    source = getattr(model, "_moeviz_source", None)
    if source is not None:
        if (Path(source) / PLAN_FILE).is_file():
            return PruningPlan.load(Path(source) / PLAN_FILE)
        if (lineage := read_lineage(source)) is not None:
            return PruningPlan(**lineage["plan"])
    raise PlanError("Which of the teacher's experts each student expert is cannot be known without the plan: "
                    "give plan=…, or a checkpoint written by `moeviz prune`.")


def pairs(student: PreTrainedModel, teacher: PreTrainedModel, plan: PruningPlan, every_layer: bool) -> list[_Pair]:
    """The MoE layers to distil (those the plan touched, or all), each with its teacher layer."""
    teacher_layers = {layer.layer_idx: layer for layer in get_adapter(teacher).layers}
    found = []
    for layer in get_adapter(student).layers:
        t = teacher_layers.get(layer.layer_idx)
        if t is None:
            raise PlanError(f"The teacher has no MoE layer {layer.layer_idx}: is it the student's original?")
        pruned = plan.pruned.get(layer.layer_idx, [])
        if not (pruned or plan.sparsity or plan.nm or every_layer):
            continue
        if not layer.fused or not t.fused:
            raise NotImplementedError("Recovery needs transformers 5's fused expert layouts.")
        wrapper = layer.block.experts
        if isinstance(wrapper, NoviceExperts):  # the router still routes over all E
            to_inner, to_novice = (v.clone() for v in wrapper.index(torch.device("cpu")))
            to_teacher = torch.arange(wrapper.num_experts)
        else:
            kept = torch.tensor(plan.kept(layer.layer_idx, t.num_experts))
            if len(kept) != layer.num_experts:
                raise PlanError(f"Layer {layer.layer_idx} of the student has {layer.num_experts} experts; "
                                f"the plan keeps {len(kept)}: is the student this plan's model?")
            to_inner, to_novice, to_teacher = torch.arange(len(kept)), None, kept
        device = execution_device(layer.block)
        found.append(_Pair(layer, t, to_teacher.to(device), to_inner.to(device),
                           None if to_novice is None else to_novice.to(device)))
    return found


def _expert_outputs(layer: MoELayer, x: torch.Tensor, ids: torch.Tensor, num: int) -> torch.Tensor:
    """f_e(x) for tokens sorted by expert id; one expert at a time (differentiable on every device:
    grouped matmuls have no CPU backward)."""
    counts = torch.bincount(ids, minlength=num).tolist()
    outs = [layer.expert_forward(e, part)[1] for e, part in enumerate(torch.split(x, counts)) if counts[e]]
    return torch.cat(outs) if outs else x.new_zeros(0, layer.hidden_size)


def _distilling_forward(pair: _Pair, losses: list, armed: dict):
    """The experts' forward (hidden, top_k_index, top_k_weights) that also adds the MSE between
    each routed (token, expert) output and the teacher's expert on the same token to `losses`."""
    student, teacher = pair.student, pair.teacher

    def forward(hidden, top_k_index, top_k_weights):
        T, k = top_k_index.shape
        ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
        token = order // k
        x = hidden.index_select(0, token)  # (S, H), sorted by router index
        gates = top_k_weights.reshape(-1).index_select(0, order)
        inner = pair.to_inner[ids]
        kept = (inner >= 0).nonzero().squeeze(1)
        out = _expert_outputs(student, x.index_select(0, kept), inner.index_select(0, kept), student.num_experts)
        if pair.to_novice is not None:  # novices answer for the pruned experts
            full = x.new_zeros(len(ids), student.hidden_size, dtype=out.dtype)
            full = full.index_copy(0, kept, out)
            novice = (inner < 0).nonzero().squeeze(1)
            out = full.index_copy(0, novice, student.novices[pair.to_novice[ids.index_select(0, novice)]].to(out.dtype))
        with torch.no_grad():
            t_ids = pair.to_teacher[ids]  # sorted too: the kept list is
            counts = torch.bincount(t_ids, minlength=teacher.num_experts)
            dev = execution_device(teacher.block)
            _, target = teacher.experts_forward_sorted(x.detach().to(dev), t_ids.to(dev), counts.to(dev))
        target = target.to(out.device).float()  # relative to the teacher's output size: scale-free
        # computed in the recompute too: checkpointing needs the same tensors saved both times
        error = F.mse_loss(out.float(), target) / target.pow(2).mean().clamp_min(1e-12)
        if armed["on"]:  # not when gradient checkpointing recomputes the layer in the backward pass
            losses.append(error)
        combined = torch.zeros(T, out.shape[1], device=out.device).index_add(0, token, out.float() * gates.float()[:, None])
        return combined.to(hidden.dtype)

    return forward


@contextmanager
def _swapped(found: list[_Pair], losses: list, armed: dict):
    modules = [pair.student.block.experts for pair in found]
    try:
        for module, pair in zip(modules, found):
            module.forward = _distilling_forward(pair, losses, armed)
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)


def trainable(student: PreTrainedModel, found: list[_Pair], plan: PruningPlan, train_all: bool) -> list[nn.Parameter]:
    """The parameters recovery trains (see the module doc); the rest is frozen."""
    if train_all:
        chosen = list(student.parameters())
    else:
        chosen = []
        for pair in found:
            experts = pair.student.block.experts
            chosen += list(pair.student.experts.parameters())  # the kept experts
            if isinstance(experts, NoviceExperts) and plan.mode == "novice":  # a drop's zeros stay dropped
                chosen.append(experts.novices)
            if plan.pruned.get(pair.student.layer_idx):
                chosen += list(pair.student.router.parameters())
    ids = {id(p) for p in chosen}
    for p in student.parameters():
        p.requires_grad_(id(p) in ids)
    return [p for p in student.parameters() if p.requires_grad]


def _sparse_weights(found: list[_Pair]) -> list[nn.Parameter]:
    """The kept experts' weight matrices, whose zeros (the plan's sparsity) must stay zero."""
    return [p for pair in found for p in pair.student.experts.parameters() if p.dim() >= 2]


def _schedule(config: DistillConfig, step: int, progress: float) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def distill(student: PreTrainedModel, teacher: PreTrainedModel, tokens: torch.Tensor,
            config: DistillConfig = DistillConfig(), plan: PruningPlan | None = None,
            progress: Progress | None = None) -> dict:
    """Fine-tune `student` (pruned by `plan`, else by the plan its checkpoint records) in place
    against `teacher` (its original) on token sequences `tokens` (N, L), cycled in a shuffled
    order, until the first budget of `config` ends. Returns the training report."""
    plan = plan or plan_of(student)
    found = pairs(student, teacher, plan, config.train_all)
    if not found:
        raise PlanError("The plan changes nothing this recovery trains (no pruned expert, no sparsity).")
    params = trainable(student, found, plan, config.train_all)
    sparse = _sparse_weights(found) if plan.sparsity or plan.nm else []
    # a zero weight gets no gradient: with no weight decay, Adam never moves it (no mask is stored)
    hooks = [p.register_hook(lambda grad, p=p: grad.masked_fill(p == 0, 0)) for p in sparse]
    teacher.requires_grad_(False)
    # bf16/fp16 weights train through float32 master copies (an update smaller than the weight's
    # last bit would be lost), copied back after every step; float32 weights train in place
    masters = [p.detach().float() if p.dtype != torch.float32 else p for p in params]
    for m in masters:
        m.requires_grad_(True)
    optimizer = torch.optim.AdamW(masters, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    device = execution_device(student)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if config.gradient_checkpointing:
        (getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable)()
    student.train(config.gradient_checkpointing)  # train mode only where checkpointing needs it (no jitter)
    gen = torch.Generator().manual_seed(config.seed)
    order, cursor = torch.randperm(len(tokens), generator=gen), 0
    losses: list[torch.Tensor] = []
    armed = {"on": True}
    history, seen, step, start = [], 0, 0, time.perf_counter()

    def done_share() -> float:
        shares = [step / config.steps if config.steps else 0.0,
                  seen / config.max_tokens if config.max_tokens else 0.0,
                  (time.perf_counter() - start) / 60 / config.max_minutes if config.max_minutes else 0.0]
        return max(shares)

    try:
        with _swapped(found, losses, armed):
            while done_share() < 1.0:
                if cursor + config.batch_size > len(tokens):
                    order, cursor = torch.randperm(len(tokens), generator=gen), 0
                batch = tokens[order[cursor:cursor + config.batch_size]].to(device)
                cursor += config.batch_size
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * _schedule(config, step, done_share())
                losses.clear()
                armed["on"] = True
                with autocast:
                    logits = student(input_ids=batch, use_cache=False).logits
                    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
                    mse = torch.stack(losses).sum() if losses else ce.new_zeros(())
                    loss = ce + config.expert_mse * mse
                    kl = ce.new_zeros(())
                    if config.logit_kl:
                        with torch.no_grad():
                            target = teacher(input_ids=batch.to(execution_device(teacher)), use_cache=False).logits
                        kl = F.kl_div(logits.float().log_softmax(-1), target.to(device).float().log_softmax(-1),
                                      log_target=True, reduction="batchmean") / batch.shape[1]
                        loss = loss + config.logit_kl * kl
                armed["on"] = False
                loss.backward()
                for p, m in zip(params, masters):
                    if m is not p:
                        m.grad = None if p.grad is None else p.grad.float()
                        p.grad = None
                torch.nn.utils.clip_grad_norm_(masters, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for p, m in zip(params, masters):
                        if m is not p:
                            p.copy_(m)
                step, seen = step + 1, seen + batch.numel()
                row = dict(loss=loss.item(), ce=ce.item(), mse=mse.item(), kl=kl.item(),
                           lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start)
                history.append(row)
                if progress is not None:
                    progress(step, config.steps, row)
    finally:
        for hook in hooks:
            hook.remove()
        if config.gradient_checkpointing:
            (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()
            student.disable_input_require_grads()  # the embedding hook checkpointing set
        student.requires_grad_(False)
        student.eval()
    first, last = history[0], history[-1]
    return dict(steps=step, tokens=seen, minutes=round((time.perf_counter() - start) / 60, 2),
                trained_params=sum(p.numel() for p in params), layers=[pair.student.layer_idx for pair in found],
                first={k: first[k] for k in ("loss", "ce", "mse", "kl")},
                last={k: last[k] for k in ("loss", "ce", "mse", "kl")}, config=asdict(config))


# ---- saving -----------------------------------------------------------------------------
def _refuse_quantized(ckpt: Checkpoint) -> None:
    if any(scale_key(ckpt, key) for key in ckpt.keys()):
        raise NotImplementedError(f"{ckpt.path} holds FP8 weights: a recovered model trains in {ckpt.main_dtype}, "
                                  "and moeviz does not quantize it back. Recover an export of a bf16 checkpoint.")


def save_recovered(student: PreTrainedModel, pruned_dir, out_dir, lineage: dict | None = None) -> Path:
    """Write `student` as the pruned checkpoint `pruned_dir` it was loaded from is written (the
    same files, keys and dtypes, the same plan and config), into the new directory `out_dir`,
    atomically; it reloads with `moeviz.loading.load_model` like the export."""
    from .card import with_verification
    from .export import CARD_FILE, file_checksums
    from .reload import ExportLayout

    src, out = Path(pruned_dir), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: give a new directory (or an empty one) for the output.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is a directory that is not empty: give a new directory (or an empty one).")
    ckpt = Checkpoint(src)
    _refuse_quantized(ckpt)
    layout = ExportLayout(src, read_config(src))
    layout.bind(get_adapter(student))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for file in ckpt.files:
            tensors = {}
            for key in (k for k in ckpt.keys() if ckpt.file_of[k] == file):
                tensors[key] = layout.target(key).detach().to("cpu", ckpt.dtype(key)).contiguous()
            save_file(tensors, tmp / file.name, metadata={"format": "pt"})
        for file in src.iterdir():  # config, plan, index, tokenizer, model card
            if file.is_file() and file.suffix != ".safetensors" and file.name != LINEAGE_FILE:
                shutil.copy2(file, tmp / file.name)
        if lineage is not None:  # the export's checksums and verifications are not these files'
            lineage = {k: v for k, v in lineage.items() if k != "verifications"} | dict(files=file_checksums(tmp))
            (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str))
            if (tmp / CARD_FILE).is_file():
                (tmp / CARD_FILE).write_text(with_verification((tmp / CARD_FILE).read_text(), []))
            if (tmp / CARD_FILE).is_file() and (recovery := lineage.get("recovery")):
                with open(tmp / CARD_FILE, "a") as card:
                    card.write(f"\n## Recovery\n\nAfter pruning, distilled from `{lineage.get('teacher')}` for "
                               f"{recovery.get('steps')} steps ({recovery.get('minutes')} min) by `moeviz distill`; "
                               "the evaluation above is the pruned model's, before recovery.\n")
        readable(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def recover_checkpoint(pruned_dir, teacher: PreTrainedModel, teacher_name: str, tokens: torch.Tensor,
                       config: DistillConfig, out_dir, device: str = "auto",
                       progress: Progress | None = None, check: torch.Tensor | None = None) -> tuple[PreTrainedModel, dict]:
    """Load the pruned checkpoint `pruned_dir` (what `moeviz prune` wrote), distil it against
    `teacher` and write it to `out_dir` with its lineage (parent, teacher, plan, recovery).

    With `check` (held-out token sequences), the result is compared with the pruned model it
    started from on them (KL to the teacher): when training made it worse, the pruned model is
    kept instead, nothing is written, and the report says so (`kept`, `why`, `checkpoint` the
    pruned one). Returns (the model kept, the training report)."""
    from .evaluate import fidelity

    _refuse_quantized(Checkpoint(pruned_dir))  # before any training
    student, _ = load_model(pruned_dir, device=device)  # in the checkpoint's dtype, the teacher's
    plan = plan_of(student)
    teacher_fingerprint = model_fingerprint(teacher)
    plan.validate(model_info(teacher, fingerprint=teacher_fingerprint))  # the teacher is its original
    def held_out() -> dict:  # the training objective's text terms on held-out sequences
        found = fidelity(student, teacher, check, perplexity=True)
        ce = math.log(found["perplexity"])
        return dict(ce=ce, kl=found["kl"], loss=ce + config.logit_kl * found["kl"])

    objective = "cross-entropy" + (f" + {config.logit_kl:g} × KL to the original" if config.logit_kl else "")
    before = held_out() if check is not None else None
    report = distill(student, teacher, tokens, config, plan, progress)
    if check is not None:
        after = held_out()
        report["check"] = dict(sequences=len(check), objective=objective,
                               **{f"{k}_{when}": v[k] for when, v in (("before", before), ("after", after)) for k in v})
        said = (f"on {len(check)} held-out sequences the loss ({objective}) went from {before['loss']:.4g} to "
                f"{after['loss']:.4g} (KL to the original {before['kl']:.4g} → {after['kl']:.4g})")
        if after["loss"] > before["loss"]:  # recovery made it worse: the pruned model stays what it was
            del student
            student, _ = load_model(pruned_dir, device=device)
            report.update(kept="pruned", checkpoint=str(Path(pruned_dir).resolve()),
                          why=f"{said}: it rose, the pruned model is kept")
            return student, report
        report.update(kept="recovered", why=said)
    lineage = dict(parent=str(Path(pruned_dir).resolve()), teacher=teacher_name,
                   teacher_fingerprint=teacher_fingerprint, plan=json.loads(plan.to_json()), recovery=report)
    out = save_recovered(student, pruned_dir, out_dir, lineage)
    report["checkpoint"] = str(out.resolve())
    return student, report
