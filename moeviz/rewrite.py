"""The tensors of an export: what a plan does to each tensor of the source files, one tensor at
a time, written shard by shard (`Rewriter`, which `moeviz.export.export_plan` drives).

Files hold experts as transformers saves them: one key per expert and projection
(`…layers.3.mlp.experts.5.gate_proj.weight`, with `…weight_scale_inv` beside it in a
block-wise FP8 checkpoint) or fused (E, …) tensors (`…layers.3.mlp.experts.gate_up_proj`,
GPT-OSS). Quantized tensors of kept experts are copied byte for byte. Router rows, merges and
weight sparsity are rewritten as `moeviz.apply` does them in memory; multi-token-prediction
layers the files hold beyond the decoder's are pruned, dropped or kept whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import Adapter
from .checkpoint import ROLES, Checkpoint, ExpertKey, dequantize, parse_expert_key, scale_key
from .methods.moe_pruner import pruning_mask
from .moe_layer import ExpertWeights
from .plan import STANDARD, SUBSTITUTION, ExportKind, PruningPlan
from .reload import expert_file_tensors, file_tensors
from .stats import ExpertStats
from .surgery import align_neurons, novices_of, renumber_ids

INDEX_FILE = "model.safetensors.index.json"
REPLACEMENTS_FILE = "model-expert-replacements.safetensors"  # the substitution's constant vectors
Progress = Callable[[int, int], None]  # (done, total) in source tensors


MTP_CHOICES = ("prune", "drop")  # what an export does with the multi-token-prediction layers in the files


def mtp_layers(keys, adapter: Adapter) -> dict[int, str]:
    """The multi-token-prediction layers the files hold beyond the decoder's: their number (≥ the
    config's `num_hidden_layers`, under the decoder layers' own prefix) → that prefix, `model.layers.`."""
    text = adapter.model.config.get_text_config()
    heads = {m["head"] for key in keys if (m := _LAYER.match(key)) and int(m["layer"]) in adapter.layer_indices}
    found = {}
    for key in keys:
        m = _LAYER.match(key)
        if m and m["head"] in heads and int(m["layer"]) >= text.num_hidden_layers:
            found[int(m["layer"])] = m["head"]
    return found


_LAYER = re.compile(r"^(?P<head>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<rest>.+)$")


def fused_expert_keys(adapter: Adapter) -> dict[str, ExpertKey]:
    """File key → `ExpertKey` of every fused (E, …) expert tensor whose name in the files is not
    `…layers.N.….experts.<name>` (Granite-MoE's `input_linear.weight`, Aria's `experts.fc1.weight`,
    per-expert norms): the names `save_pretrained` gives the experts' tensors."""
    name_of = {id(m): n for n, m in adapter.model.named_modules()}
    heads = {layer.layer_idx: name_of[id(layer.block.experts)] + "." for layer in adapter.layers}  # `….experts.`
    found = {}
    for key, (layer_idx, t) in expert_file_tensors(adapter).items():
        if parse_expert_key(key, (layer_idx,)) is None and t.dim() and t.shape[0] == adapter.layer(layer_idx).num_experts:
            found[key] = ExpertKey(layer_idx, None, key.rsplit(".", 1)[-1], heads[layer_idx])
    return found


class Rewriter:
    """What the plan does to each tensor of the source files, one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, adapter: Adapter, plan: PruningPlan, stats: ExpertStats | None,
                 kind: ExportKind, quantization: dict | None, mtp: str | None = None):
        self.ckpt, self.adapter, self.plan, self.stats, self.kind = ckpt, adapter, plan, stats, kind
        self.row = {layer.layer_idx: row for row, layer in enumerate(adapter.layers)}
        self.num_experts = {layer.layer_idx: layer.num_experts for layer in adapter.layers}
        self.sparse = bool(plan.sparsity or plan.nm)
        self.renumber = kind.name != SUBSTITUTION  # the substitution format keeps logical ids
        self.block = (quantization or {}).get("weight_block_size")  # FP8 scales' blocks
        self.dtype = ckpt.main_dtype  # the compute dtype (FP8 weights dequantize to it)
        self.expert_keys: dict[tuple[int, int], dict[str, str]] = {}  # (layer, expert) → {name: key}
        self.fused: set[int] = set()  # layers whose files hold fused (E, …) tensors
        self.heads: dict[int, str] = {}  # layer → key prefix of its experts
        self.fused_keys = fused_expert_keys(adapter)
        for key in ckpt.keys():
            if (ek := self._expert_key(key)) is None:
                continue
            self.heads[ek.layer_idx] = ek.head
            if ek.expert_idx is None:
                self.fused.add(ek.layer_idx)
            else:
                self.expert_keys.setdefault((ek.layer_idx, ek.expert_idx), {})[ek.name] = key
        self.routers = self._router_keys(adapter)
        self._mtp_plan(mtp)
        self._merged: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._check_layout(quantization)
        self.replacement_names: dict[int, dict[int, str]] = {}  # layer → {pruned expert: tensor name}
        if kind.name == SUBSTITUTION:
            for layer_idx, experts in ((i, e) for i, e in plan.pruned.items() if e):  # layers with novices
                base = self.heads[layer_idx].removesuffix(".").removesuffix("experts")
                self.replacement_names[layer_idx] = {e: f"{base}expert_replacements.{e}.value" for e in experts}

    def _expert_key(self, key: str) -> ExpertKey | None:
        return parse_expert_key(key, self.row) or self.fused_keys.get(key)

    def _router_keys(self, adapter: Adapter) -> dict[str, tuple[int, bool, int]]:
        """File key of every expert-indexed tensor outside the experts (router rows, biases held by
        the router or the block, tables of expert ids) → (decoder layer, is it the router's weight,
        its expert dimension, None for a table of ids)."""
        key_of = {id(t): k for k, t in file_tensors(adapter).items()}
        keys = {}
        for layer in adapter.layers:
            for _, t, dim in layer.indexed_tensors() + [(name, t, None) for name, t in layer.id_tables()]:
                if id(t) in key_of:
                    keys[key_of[id(t)]] = (layer.layer_idx, t is layer.router_weight, dim)
        return keys

    def _mtp_plan(self, mtp: str | None) -> None:
        """What happens to the MTP layers in the files (`export_plan`'s `mtp`), decided before
        anything is written: `mtp_keep` maps each pruned MTP layer to the experts it keeps."""
        self.mtp, self.mtp_choice = mtp_layers(self.ckpt.keys(), self.adapter), mtp
        self.mtp_keep: dict[int, list[int]] = {}
        self.mtp_note = None
        if mtp is not None and mtp not in MTP_CHOICES:
            raise ValueError(f"mtp must be one of {', '.join(MTP_CHOICES)}, not {mtp!r}.")
        if not self.mtp:
            return
        where = ", ".join(f"{head}{n}" for n, head in sorted(self.mtp.items()))
        last = self.adapter.layers[-1]
        count = last.num_experts - len(self.plan.pruned.get(last.layer_idx, ()))  # one count in a standard export
        if mtp is None:
            if self.kind.name != STANDARD or count == last.num_experts:  # the config's count stays as it was
                self.mtp_note = f"MTP layer {where}: kept whole (the config still says {last.num_experts} experts)."
                return
            raise ValueError(f"{self.ckpt.path} holds multi-token-prediction layers ({where}) with "
                             f"{last.num_experts} experts, which this plan cuts to {count} in the config: choose "
                             "mtp='prune' (cut them to the same count by their router rows) or mtp='drop' "
                             "(leave them out, num_nextn_predict_layers 0).")
        if mtp == "drop":
            self.mtp_note = f"MTP layer {where}: left out (num_nextn_predict_layers 0); speculative decoding with it is off."
            return
        if self.kind.name != STANDARD:
            raise ValueError("mtp='prune' is for exports with one expert count (remove or merge plans, the same count "
                             "in every layer); keep the MTP layers whole (mtp unset) or drop them.")
        rel = {}  # names of the expert-indexed tensors within a decoder layer → (is the router's weight, dim)
        for key, (layer_idx, is_weight, dim) in self.routers.items():
            rel[key.split(f"layers.{layer_idx}.", 1)[1]] = (is_weight, dim)
        self.mtp_rel = rel
        for n, head in self.mtp.items():
            weight = next((f"{head}{n}.{r}" for r, (w, _) in rel.items() if w), None)
            if weight is None or weight not in self.ckpt.file_of:
                raise NotImplementedError(f"moeviz cannot find the router of MTP layer {head}{n} in the files.")
            norms = self.ckpt.tensor(weight).float()[:last.num_experts].norm(dim=-1)
            self.mtp_keep[n] = sorted(torch.topk(norms, count).indices.tolist())
        self.mtp_note = (f"MTP layer {where}: its experts cut to {count}, keeping those with the largest router rows "
                         "‖w_e‖ (moeviz does not calibrate through MTP layers, which transformers does not run).")

    def _rewrite_mtp(self, key: str, n: int, rest: str) -> tuple[str, torch.Tensor] | None:
        """An MTP layer's tensor, by `_mtp_plan`'s decision."""
        if self.mtp_choice == "drop":
            return None
        keep = self.mtp_keep.get(n)
        if keep is None:
            return key, self.ckpt.tensor(key)
        if rest in self.mtp_rel:
            tensor = self.ckpt.tensor(key)
            dim = self.mtp_rel[rest][1]
            E = self.adapter.layers[-1].num_experts
            return key, tensor.index_select(dim, torch.tensor(keep + list(range(E, tensor.shape[dim]))))
        ek = parse_expert_key(key, (n,))
        if ek is None:
            return key, self.ckpt.tensor(key)
        if ek.expert_idx is None:  # fused (E, …)
            return key, self.ckpt.tensor(key).index_select(0, torch.tensor(keep))
        if ek.expert_idx not in keep:
            return None
        return ek.renumbered(keep.index(ek.expert_idx)), self.ckpt.tensor(key)

    def _check_layout(self, quantization: dict | None) -> None:
        for layer_idx, E in self.num_experts.items():
            if not (self.plan.pruned.get(layer_idx) or self.sparse):
                continue
            per_expert = all((layer_idx, e) in self.expert_keys for e in range(E))
            if not (per_expert or layer_idx in self.fused):
                raise NotImplementedError(f"moeviz cannot find the experts of layer {layer_idx} in "
                                          f"{self.ckpt.path}'s files.")
            if layer_idx in self.fused and (self.sparse or self.plan.mode == "merge"):
                raise NotImplementedError("Merging and weight sparsity are not supported when the files "
                                          "hold fused expert tensors (GPT-OSS): export remove, novice or "
                                          "drop plans, or apply the plan in memory.")
        if quantization is None:
            return
        method = quantization.get("quant_method", "quantized")
        if self.plan.mode == "merge" and self.plan.num_pruned:
            raise NotImplementedError(f"This checkpoint is {method}-quantized: merging averages expert weights, "
                                      "which cannot keep its quantization. Export remove, novice or drop plans, or "
                                      "merge a bf16 copy of the model.")
        if self.sparse:
            for keys in self.expert_keys.values():
                for name, key in keys.items():
                    if ROLES.get(name) in ("gate", "up", "down") and not self._is_fp8(key):
                        raise NotImplementedError(f"Weight sparsity keeps a quantized checkpoint's format only for "
                                                  f"FP8 weights (zero is exact in FP8); {key} is "
                                                  f"{self.ckpt.info(key)['dtype']}.")

    def _is_fp8(self, key: str) -> bool:
        return self.ckpt.dtype(key) in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_key(self.ckpt, key) is not None

    def output_bytes(self) -> int:
        """What the export will write, for the disk-space check: every kept tensor, and the constants."""
        total = 0
        for key in self.ckpt.keys():
            ek = self._expert_key(key)
            info = self.ckpt.info(key)
            size = info["data_offsets"][1] - info["data_offsets"][0]
            if ek is not None and self.plan.pruned.get(ek.layer_idx):
                E = self.num_experts[ek.layer_idx]
                kept = E - len(self.plan.pruned[ek.layer_idx])
                if ek.expert_idx is None:
                    size = size * kept // E
                elif ek.expert_idx in self.plan.pruned[ek.layer_idx]:
                    size = 0
            total += size
        hidden = {layer.layer_idx: layer.hidden_size for layer in self.adapter.layers}
        width = torch.empty((), dtype=self.dtype).element_size()
        return total + sum(len(v) * hidden[i] * width for i, v in self.replacement_names.items())

    def write(self, out: Path, progress: Progress | None) -> None:
        """One output shard per source shard (same file name), the constants, then the index."""
        by_file: dict[Path, list[str]] = {}
        for key in self.ckpt.keys():
            by_file.setdefault(self.ckpt.file_of[key], []).append(key)
        weight_map, total_size, done = {}, 0, 0

        def save(tensors: dict, name: str) -> None:
            nonlocal total_size
            save_file(tensors, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())

        for file in sorted(by_file):
            tensors = {}
            for key in by_file[file]:
                if (item := self.rewrite(key)) is not None:
                    tensors[item[0]] = item[1].contiguous()
                done += 1
                if progress is not None:
                    progress(done, len(self.ckpt.file_of))
            if tensors:
                save(tensors, file.name)
            del tensors
            self.ckpt.close()  # unmap the shards read so far, or their pages stay resident
        if self.replacement_names:
            constants = {}
            for layer_idx, names in self.replacement_names.items():
                layer = self.adapter.layer(layer_idx)
                values = novices_of(layer, self.plan, self.stats, self.row[layer_idx], list(names), self.dtype)
                constants.update({name: v.contiguous() for name, v in zip(names.values(), values)})  # (H,) each
            save(constants, REPLACEMENTS_FILE)
        index = dict(metadata=dict(total_size=total_size), weight_map=dict(sorted(weight_map.items())))
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def rewrite(self, key: str) -> tuple[str, torch.Tensor] | None:
        """(new key, tensor) for one source tensor, or None when the plan drops it."""
        if self.mtp and (m := _LAYER.match(key)) and int(m["layer"]) in self.mtp:
            return self._rewrite_mtp(key, int(m["layer"]), m["rest"])
        if key in self.routers:
            return key, self._router(key, *self.routers[key])
        ek = self._expert_key(key)
        if ek is None or not (self.plan.pruned.get(ek.layer_idx) or self.sparse):
            return key, self.ckpt.tensor(key)
        keep = self.plan.kept(ek.layer_idx, self.num_experts[ek.layer_idx])
        if ek.expert_idx is None:  # fused (E, …), GPT-OSS: no sparsity or merge here; kept rows, compact
            return key, self.ckpt.tensor(key).index_select(0, torch.tensor(keep))
        if ek.expert_idx not in keep:
            return None
        if ek.expert_idx in self._groups(ek.layer_idx):
            tensor = self._merged_expert(ek.layer_idx, ek.expert_idx).pop(ek.name)
        else:
            tensor = self._sparsified(ek.layer_idx, ek.expert_idx, key, ek.name, self.ckpt.tensor(key))
        return (ek.renumbered(keep.index(ek.expert_idx)) if self.renumber else key), tensor

    def _router(self, key: str, layer_idx: int, is_weight: bool, dim: int | None) -> torch.Tensor:
        """Router rows (or biases) of the kept experts; a survivor's row merged as apply_plan does;
        a table of expert ids renumbered as `surgery.renumber_ids` does."""
        if self.plan.mode not in ("remove", "merge") or not self.plan.pruned.get(layer_idx):
            return self.ckpt.tensor(key)  # novices and drops: the router still routes to all E experts
        keep = self.plan.kept(layer_idx, self.num_experts[layer_idx])
        if dim is None:
            weight = next(k for k, (i, w, _) in self.routers.items() if i == layer_idx and w)
            router = self._router(weight, layer_idx, True, 0)  # the kept rows; merged rows as merged
            full = self.ckpt.tensor(weight)
            full[keep] = router[:len(keep)]
            return renumber_ids(self.ckpt.tensor(key), keep, full[:self.num_experts[layer_idx]],
                                self.plan.merge_into.get(layer_idx))
        tensor = self.ckpt.tensor(key)
        if is_weight:
            for members in self._groups(layer_idx).values():
                w = self._merge_weights(layer_idx, members)
                tensor[members[0]] = sum(wi * tensor[m].float() for wi, m in zip(w, members)).to(tensor.dtype)
        return tensor.index_select(dim, torch.tensor(keep + list(range(self.num_experts[layer_idx], tensor.shape[dim]))))

    def _sparsified(self, layer_idx: int, e: int, key: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Zero the lowest |W|·‖gX‖ weights of every row (MoE-Pruner), as `apply_plan` does. An FP8
        weight is scored dequantized, as the model in memory holds it, and zeroed in FP8."""
        role = ROLES.get(name)
        if not self.sparse or role in ("gate_bias", "up_bias", "down_bias") or name.endswith(("scale", "scale_inv")):
            return tensor
        if role is None:
            raise NotImplementedError(f"Weight sparsity: unknown expert tensor {name!r} in layer {layer_idx}.")
        norm = self.stats["mid_sqnorm" if role == "down" else "in_sqnorm"][self.row[layer_idx], e]
        if self._is_fp8(key):
            weight = dequantize(tensor, self.ckpt.tensor(scale_key(self.ckpt, key)), self.dtype, self.block)
            mask = pruning_mask(weight, norm, self.plan.sparsity, self.plan.nm)
            return tensor.view(torch.uint8).masked_fill(mask, 0).view(tensor.dtype)  # +0 in FP8 is all-zero bits
        return tensor.masked_fill(pruning_mask(tensor, norm, self.plan.sparsity, self.plan.nm), 0)

    # ---- merging ------------------------------------------------------------------------
    def _groups(self, layer_idx: int) -> dict[int, list[int]]:
        """survivor → [survivor, its sources…], in apply's order (merges only)."""
        groups: dict[int, list[int]] = {}
        if self.plan.mode == "merge" and self.plan.pruned.get(layer_idx):
            for src, dst in self.plan.merge_into.get(layer_idx, {}).items():
                groups.setdefault(dst, [dst]).append(src)
        return groups

    def _merge_weights(self, layer_idx: int, members: list[int]) -> list[float]:
        w = self.stats.frequency[self.row[layer_idx]][members].float().clamp(min=1e-12)
        return (w / w.sum()).tolist()  # as apply's merge takes them

    def _merged_expert(self, layer_idx: int, dst: int) -> dict[str, torch.Tensor]:
        """The survivor's tensors {name: (out, in)}: its members' weights, neurons aligned to the
        survivor's, averaged by frequency, as `apply_plan` does. Members may sit in other shards."""
        if (layer_idx, dst) not in self._merged:
            members = self._groups(layer_idx)[dst]
            experts = {e: self._expert_weights(layer_idx, e, sparsify=e == dst) for e in members}
            for src in members[1:]:
                align_neurons(experts[dst], experts[src])
            w = self._merge_weights(layer_idx, members)
            self._merged[layer_idx, dst] = {
                name: sum(wi * getattr(experts[m], ROLES[name]) for wi, m in zip(w, members))
                .to(self.ckpt.dtype(key)) for name, key in self.expert_keys[layer_idx, dst].items()}
        return self._merged[layer_idx, dst]

    def _expert_weights(self, layer_idx: int, e: int, sparsify: bool) -> ExpertWeights:
        found = {}
        for name, key in self.expert_keys[layer_idx, e].items():
            if name not in ROLES:
                raise NotImplementedError(f"Merging: unknown expert tensor {name!r} in layer {layer_idx}.")
            tensor = self.ckpt.tensor(key)
            found[ROLES[name]] = (self._sparsified(layer_idx, e, key, name, tensor) if sparsify else tensor).float()
        return ExpertWeights(**{"gate": None, **found})
