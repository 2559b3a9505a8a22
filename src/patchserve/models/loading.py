"""Load a Hugging Face checkpoint (local folder or hub id) into a :class:`Transformer`.

Weights stream tensor by tensor from ``*.safetensors`` (sharded checkpoints
through their ``model.safetensors.index.json``), are renamed by the family's
mapping, shape-checked against the runtime's parameters and cast to the
requested dtype. Every way a checkpoint can be wrong ends in one
:class:`CheckpointError` that says what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from patchserve.models.config import CheckpointError, ModelConfig
from patchserve.models.hooks import HOOKS
from patchserve.models.layers import Rotary
from patchserve.models.placement import Placement, plan
from patchserve.models.registry import REGISTRY, family_for
from patchserve.models.transformer import Transformer

HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}") from None


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    path: Path
    raw_config: dict[str, Any]
    runtime: str = "native"  # or "transformers" (models/generic/)
    hooks: tuple[str, ...] = HOOKS  # the hooks the runtime provides for this model
    fallback: str | None = None  # why the checkpoint is served through transformers (auto)


RUNTIMES = ("auto", "native", "transformers")


def choose_runtime(raw: dict[str, Any], runtime: str = "auto") -> tuple[str, str | None]:
    """The runtime of a parsed ``config.json`` and, when ``auto`` fell back, why.

    ``auto``: native when an architecture is in ``models/registry.py``, else transformers.
    """
    if runtime not in RUNTIMES:
        raise CheckpointError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime, None
    architectures = raw.get("architectures") or []
    if any(arch in REGISTRY for arch in architectures):
        return "native", None
    found = ", ".join(architectures) or f"model_type {raw.get('model_type')!r}"
    return (
        "transformers",
        f"architecture {found} has no native family; serving through transformers",
    )


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local folder as is; anything else is treated as a hub id and downloaded."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder")
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"checkpoint folder {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: all one message
        raise CheckpointError(
            f"{name} is not a local folder and could not be fetched from the hub: {exc}"
        ) from exc


def read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    return raw


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in the index are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    return files


def load_model(
    path_or_id: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    device_map: str | None = None,
    runtime: str = "auto",
) -> LoadedModel:
    """``device_map`` (``auto``, ``balanced`` or ``"0:0-13,1:14-27"``, see
    ``models/placement.py``) places the layers over devices instead of all on ``device``.
    ``runtime`` (see :func:`choose_runtime`): ``transformers`` runs the model in
    ``transformers`` with hooks found from its module tree (``models/generic/``)."""
    folder = resolve_checkpoint(path_or_id)
    raw = read_config(folder)
    chosen, why = choose_runtime(raw, runtime)
    if chosen == "transformers":
        return _load_generic(folder, raw, device, parse_dtype(dtype), device_map, why)
    family, architecture = family_for(raw)
    cfg = family.read_config(raw, architecture)
    torch_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    placement = _placement(model, device, torch_dtype, device_map)
    params = dict(model.named_parameters())
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    loaded: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
        with handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                mapped = family.map_tensor(name, handle.get_tensor(name), cfg)
                if mapped is None:
                    raise CheckpointError(
                        f"{file.name}: unexpected tensor {name!r} for {architecture}"
                    )
                for target, value in mapped:
                    if target not in params or target in tied:
                        raise CheckpointError(
                            f"{file.name}: tensor {name!r} maps to {target!r}, "
                            f"which {architecture} with this config.json does not have"
                        )
                    expected = tuple(params[target].shape)
                    if tuple(value.shape) != expected:
                        raise CheckpointError(
                            f"{file.name}: tensor {name!r} has shape {tuple(value.shape)}, "
                            f"expected {expected} from config.json"
                        )
                    where = _device_of_param(target, placement)
                    loaded[target] = value.to(device=where, dtype=torch_dtype)
    missing = sorted(set(params) - set(loaded) - tied)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{folder}: checkpoint lacks {len(missing)} tensors: {shown}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        if placement.output_device != placement.input_device:  # a copy: the same values
            model.lm_head.weight = torch.nn.Parameter(
                model.embed_tokens.weight.to(placement.output_device), requires_grad=False
            )
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset(placement.input_device)
    model.device_map = placement if device_map is not None else None
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, config=cfg, path=folder, raw_config=raw)


def _load_generic(
    folder: Path,
    raw: dict[str, Any],
    device: str | torch.device,
    dtype: torch.dtype,
    device_map: str | None,
    why: str | None,
) -> LoadedModel:
    from patchserve.models.generic import load_generic

    if device_map is not None:
        raise CheckpointError(
            "device maps are not supported by the transformers runtime; "
            "load the model on one --device"
        )
    try:
        model = load_generic(folder, raw, device, dtype)
    except CheckpointError as exc:
        if why is None:
            raise
        supported = ", ".join(sorted(REGISTRY))
        raise CheckpointError(
            f"{why}, which failed: {exc}; natively supported: {supported}"
        ) from exc
    return LoadedModel(model, model.cfg, folder, raw, "transformers", model.offered_hooks, why)


def _placement(
    model: Transformer, device: str | torch.device, dtype: torch.dtype, spec: str | None
) -> Placement:
    """The stages of ``spec`` (sized from the meta-built ``model``), or all on ``device``."""
    n = model.cfg.num_layers
    if spec is None:
        return Placement.single(device, n)
    width = torch.empty((), dtype=dtype).element_size()
    sizes = [sum(p.numel() for p in block.parameters()) * width for block in model.blocks]
    first: list[torch.nn.Module | None] = [model.embed_tokens, model.embed_positions]
    last: list[torch.nn.Module | None] = [model.final_norm, model.lm_head]
    first.append(model.project_in)
    last.append(model.project_out)
    for i, modules in ((0, first), (n - 1, last)):
        sizes[i] += sum(p.numel() for m in modules if m is not None for p in m.parameters()) * width
    return plan(spec, sizes)


def _device_of_param(name: str, placement: Placement) -> torch.device:
    """Blocks on their stage's device; embeddings on the first, final norm and head on the last."""
    if name.startswith("blocks."):
        return placement.device_of(int(name.split(".")[1]))
    if name.startswith(("final_norm.", "lm_head.", "project_out.")):
        return placement.output_device
    return placement.input_device
