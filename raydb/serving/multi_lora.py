"""Many LoRA adapters in one forward pass: per-sample adapter slots over preallocated buffers.

diffusers/peft activate one adapter set per model, so a batch can only hold one subject. Here each
LoRA-targeted ``nn.Linear`` is wrapped once (:class:`MultiLoraLinear`) and owns *slot* buffers for
every resident adapter, sized for the largest allowed rank ``r_max``::

    lora_down: [slots + 1, r_max, in]      lora_up: [slots + 1, out, r_max]      scale: [slots + 1]

The last slot is all zeros: the base model. A :class:`SlotRouter` shared by all wrapped layers holds
the per-sample slot index ``[B]`` of the current forward, and each layer returns::

    base(x) + scale[s_b] * (x_b @ down[s_b].T) @ up[s_b].T        for each sample b

computed as one batched matmul over the gathered factors, so the cost is one rank-``r_max`` LoRA per
sample whatever the mix of subjects. A lower-rank adapter is zero-padded to ``r_max``; the padding
adds exact zeros, so the result equals the unpadded LoRA. Loading or evicting an adapter is a copy
into a slot — the modules and their buffer shapes never change, so CUDA graphs and compiled graphs
captured over them stay valid.

Adapter files are diffusers' LoRA format (what training writes): ``<component>.<module>.lora.down
.weight`` / ``.lora.up.weight`` (UNet), ``.lora_linear_layer.down/up.weight`` (text encoder), or
peft's ``.lora_A/.lora_B.weight``; the scale ``lora_alpha / r`` comes from the adapter config that
training stores in the safetensors header (absent: alpha = r, as diffusers assumes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raydb.serving.adapters import AdapterCorrupt, AdapterError

__all__ = ["AdapterTooLarge", "AdapterUnsupported", "LoraFactors", "SlotRouter", "MultiLoraLinear",
           "wrap_linears", "parse_adapter", "max_rank"]

_PAIRS = (("lora.down.weight", "lora.up.weight"),
          ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
          ("lora_A.weight", "lora_B.weight"))


class AdapterTooLarge(AdapterError):
    """The adapter's rank is above ``serve.max_lora_rank``, the size of the slot buffers."""

    public = "the subject's adapter rank is above this server's serve.max_lora_rank"


class AdapterUnsupported(AdapterError):
    """The adapter targets modules this server does not wrap, or uses a LoRA variant it cannot run."""

    public = "the subject's adapter uses layers or a LoRA variant this server does not serve"


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: ``down`` [r, in], ``up`` [out, r]; delta = scale * x @ down.T @ up.T."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


class SlotRouter:
    """The per-sample slot index of the forward in progress, shared by every wrapped layer.

    ``index`` is ``None`` (no LoRA at all: layers return the base output) or a long tensor ``[B]``
    on the model's device whose entries are slots, ``zero_slot`` meaning the base model.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.zero_slot = num_slots
        self.index: torch.Tensor | None = None

    @contextmanager
    def route(self, index: torch.Tensor | None) -> Iterator[None]:
        previous, self.index = self.index, index
        try:
            yield
        finally:
            self.index = previous


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus each sample's own LoRA delta, chosen by the router's slot index.

    ``x``: [B, ..., in] with B = len(router.index); returns [B, ..., out].
    """

    def __init__(self, base: nn.Linear, router: SlotRouter, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.router = router
        slots = router.num_slots + 1
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("lora_down", torch.zeros(slots, max_rank, base.in_features, **kw))
        self.register_buffer("lora_up", torch.zeros(slots, base.out_features, max_rank, **kw))
        self.register_buffer("scale", torch.zeros(slots, **kw))

    # Attention code reads these from its projections (e.g. to fuse q/k/v).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        index = self.router.index
        if index is None:
            return out
        if x.shape[0] != index.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} samples routed with {index.shape[0]} slot indices")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])                              # [B, T, in]
        hidden = torch.bmm(flat, self.lora_down[index].transpose(1, 2))            # [B, T, r_max]
        hidden = hidden * self.scale[index].view(-1, 1, 1)
        delta = torch.bmm(hidden, self.lora_up[index].transpose(1, 2))             # [B, T, out]
        return out + delta.reshape(out.shape)

    @torch.no_grad()
    def write_slot(self, slot: int, factors: LoraFactors | None) -> None:
        """Copy ``factors`` (zero-padded to r_max) into ``slot``; ``None`` zeroes it."""
        self.lora_down[slot].zero_()
        self.lora_up[slot].zero_()
        self.scale[slot] = 0.0
        if factors is None:
            return
        if factors.down.shape[1] != self.in_features or factors.up.shape[0] != self.out_features:
            raise AdapterCorrupt(f"adapter weights do not fit the base model: a [{factors.up.shape[0]}x"
                                 f"{factors.down.shape[1]}] LoRA for a [{self.out_features}x"
                                 f"{self.in_features}] layer")
        self.lora_down[slot, :factors.rank] = factors.down
        self.lora_up[slot, :, :factors.rank] = factors.up
        self.scale[slot] = factors.scale


def _matches(path: str, target: str) -> bool:
    """peft's target rule: the module path is the target or ends with ``.<target>``."""
    return path == target or path.endswith("." + target)


def wrap_linears(model: nn.Module, targets: list[str], router: SlotRouter,
                 max_rank: int) -> dict[str, MultiLoraLinear]:
    """Replace every ``nn.Linear`` of ``model`` whose path matches a target; ``{path: wrapper}``."""
    found = [(path, module) for path, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(_matches(path, t) for t in targets)]
    wrapped = {}
    for path, module in found:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapped[path] = MultiLoraLinear(module, router, max_rank)
        setattr(parent, child, wrapped[path])
    return wrapped


def _pattern_value(pattern: dict[str, Any], path: str, default: float) -> float:
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", path):
            return float(value)
    return default


def parse_adapter(state: dict[str, torch.Tensor],
                  config: dict[str, Any]) -> dict[str, dict[str, LoraFactors]]:
    """``{component: {module path: LoraFactors}}`` (components ``unet``, ``text_encoder`` and SDXL's
    ``text_encoder_2``; FLUX.1's ``transformer`` and ``text_encoder``).

    ``config``: the header's ``lora_adapter_metadata`` ({"unet.lora_alpha": 8, "unet.r": 4, ...});
    empty means alpha = rank. Raises :class:`AdapterCorrupt` for unknown keys or unpaired factors,
    :class:`AdapterUnsupported` for DoRA.
    """
    downs: dict[tuple[str, str], torch.Tensor] = {}
    ups: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in state.items():
        for down_suffix, up_suffix in _PAIRS:
            for suffix, into in ((down_suffix, downs), (up_suffix, ups)):
                if key.endswith("." + suffix):
                    component, _, path = key[:-len(suffix) - 1].partition(".")
                    into[(component, path)] = tensor
                    break
            else:
                continue
            break
        else:
            raise AdapterCorrupt(f"adapter weights have an unrecognised tensor {key!r}")
    if downs.keys() != ups.keys():
        odd = sorted(set(downs) ^ set(ups))[0]
        raise AdapterCorrupt(f"adapter weights have an unpaired LoRA factor for {'.'.join(odd)}")
    out: dict[str, dict[str, LoraFactors]] = {}
    for (component, path), down in sorted(downs.items()):
        if component not in ("unet", "transformer", "text_encoder", "text_encoder_2"):
            raise AdapterCorrupt(f"adapter weights name an unknown component {component!r}")
        cfg = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
        if cfg.get("use_dora"):
            raise AdapterUnsupported("DoRA adapters are not supported by the batching engine")
        up = ups[(component, path)]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise AdapterCorrupt(f"adapter weights for {component}.{path} are not a LoRA pair "
                                 f"(down {list(down.shape)}, up {list(up.shape)})")
        rank = down.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, float(cfg.get("lora_alpha", rank)))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        out.setdefault(component, {})[path] = LoraFactors(down, up, scale)
    return out


def max_rank(parsed: dict[str, dict[str, LoraFactors]]) -> int:
    return max((f.rank for layers in parsed.values() for f in layers.values()), default=0)
