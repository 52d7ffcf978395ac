"""Find a checkpoint, read its safetensors, and load them into our modules strictly.

- `resolve_checkpoint`: a local directory, or a Hub id fetched with `huggingface_hub.snapshot_download`
  (honours `HF_HUB_OFFLINE` and the local cache; offline and not cached -> one line saying how to fix it).
- safetensors only, single file or sharded (`model.safetensors.index.json`); `.bin`/`.pt` pickles are refused.
- Modules are built with parameters on the meta device (`empty_weights`) and filled by assignment, so a model
  never exists twice in memory. Buffers (rotary tables) are built for real: they are small and not on disk.
- Name mapping is one function per family (`rename`): the identity plus dropping prefixes we do not load.
  Per-expert MoE tensors (`...mlp.experts.E.{gate,up,down}_proj.weight`) are stacked into
  `experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I) as they stream in.
- Strict: every missing and every unexpected key is named in the error.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "spk_dict.pt"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def resolve_checkpoint(model: str | Path) -> Path:
    """A local directory as is; otherwise a Hub id downloaded (or found in the cache)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{model}: expected a model directory, got a file")
    name = str(model)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{model}: no such directory (and not a Hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(name, allow_patterns=WEIGHT_PATTERNS, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not available"
        if offline:
            raise CheckpointError(
                f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it once with "
                f"`huggingface-cli download {name}` on a connected machine, or pass a local directory") from None
        raise CheckpointError(f"could not download {name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"check the id and your network, or pass a local directory") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: index lists shard(s) that are not there: {missing}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name != "spk_dict.pt"]
    if pickles:
        raise CheckpointError(f"{path}: only pickle weights ({', '.join(pickles)}); we load safetensors only, "
                              f"because unpickling can run code. Convert with `model.save_pretrained(dir)` "
                              f"in transformers (it writes safetensors)")
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def read_prefixed(path: Path, prefixes: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `read_tensors`, but only the tensors under `prefixes` are read from disk: the thinker's (most of a
    full Omni checkpoint) are skipped by name, never materialised."""
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name.startswith(prefixes):
                    yield name, sf.get_tensor(name)


@contextlib.contextmanager
def empty_weights():
    """Create nn.Parameters on the meta device while leaving buffers real (they are not in checkpoints)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def stack_experts(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, turning per-expert MoE weights into the stacked layout once a layer is complete."""
    pending: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for name, t in tensors:
        m = EXPERT_KEY.match(name)
        if not m:
            yield name, t
            continue
        prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
        pending[prefix][e][kind] = t
    for prefix, experts in pending.items():
        n = max(experts) + 1
        incomplete = [e for e in range(n) if len(experts.get(e, {})) != 3]
        if incomplete:
            raise CheckpointError(f"{prefix}: experts {incomplete} lack some of gate/up/down_proj")
        yield f"{prefix}.gate_up_proj", torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], 0) for e in range(n)])
        yield f"{prefix}.down_proj", torch.stack([experts[e]["down_proj"] for e in range(n)])


def load_into(module: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], rename: Callable[[str], str | None],
              dtype: torch.dtype, device: torch.device | str, source: str = "checkpoint") -> None:
    """Assign every parameter of `module` from `tensors` (names mapped by `rename`; None = skip)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    tied = {n for n, p in module.named_parameters(remove_duplicate=False)} - set(dict(module.named_parameters()))
    loaded: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, t in stack_experts((new, t) for old, t in tensors if (new := rename(old)) is not None):
        if name not in params:
            unexpected.append(name)
            continue
        if name in tied:
            continue  # a saved copy of a tied weight: the owner's tensor is used
        if t.shape != params[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(params[name].shape)}")
        loaded[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = sorted(set(params) - set(loaded) - tied)
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(sorted(unexpected)[:20])}"
                       + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointError(f"{source} does not match the architecture: " + "; ".join(msg))
    for name, t in loaded.items():
        owner, _, attr = name.rpartition(".")
        mod = module.get_submodule(owner) if owner else module
        setattr(mod, attr, nn.Parameter(t, requires_grad=False))
    _retie(module)
    module.to(device)


def _retie(module: nn.Module) -> None:
    """Re-point tied parameters (e.g. lm_head -> embed_tokens) after assignment replaced the owner."""
    for m in module.modules():
        tie = getattr(m, "tie_weights", None)
        if callable(tie):
            tie()
