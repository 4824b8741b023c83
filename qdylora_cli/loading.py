"""Load a causal LM shard by shard, quantizing each target weight to NF4 as it is read.

A 40B model in bf16 is 80 GB; quantized it is 21 GB. Loading it with `from_pretrained` and
quantizing afterwards needs the 80 GB first. Here the model is built as a skeleton whose
parameters live on the `meta` device (no memory); then each safetensors shard is opened and each
tensor read, cast to the compute dtype and, for a target linear layer, quantized at once, the
float copy being dropped. Peak memory is the quantized model plus one shard.

Buffers (rotary `inv_freq`, ...) are not in checkpoints: the skeleton computes them for real
while it is built (only parameters go to `meta`), exactly as a regular load does.

Checkpoints quantized by bitsandbytes (`quantization_config` with `load_in_4bit` and `nf4`) are
read without dequantizing: NF4Linear's state dict has the layout of `bnb.nn.Linear4bit`.

Checkpoint keys are renamed as `from_pretrained` renames them (`checkpoint_key_renamer`): with
transformers' own mapping of each architecture, so a checkpoint whose names differ from the
module's (GPT-NeoX's `embed_out` is the module's `lm_head` in transformers 5) loads all the same.

`fill_model` takes any stream of (name, tensor) pairs, so the benchmarks build huge random
models through the same code, one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import safetensors
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from qdylora_cli.adapters import find_target_modules
from qdylora_cli.choices import QUANT_TYPES
from qdylora_cli.config import QuantConfig
from qdylora_cli.errors import QdyloraError
from qdylora_cli.quant import NF4Linear

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# What training needs from a hub repository: config, tokenizer files and safetensors weights.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")
# The parts of one bitsandbytes 4-bit weight `P.weight`, as suffixes of `P.weight`.
BNB_QUANT_STATE = ".quant_state.bitsandbytes__nf4"
NF4 = QuantConfig()  # QLoRA's: NF4 with double quantization, blocks of 64
BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", BNB_QUANT_STATE)


# --- where the weights are ---------------------------------------------------------------------------


def resolve_model_dir(name_or_path: str, *, trust_remote_code: bool = False) -> Path:
    """A local directory with config.json and safetensors weights: `name_or_path` itself or a hub snapshot.

    Hub downloads fetch only config, tokenizer and safetensors files, not .bin/.pt duplicates.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    patterns = [*HUB_PATTERNS, "*.py"] if trust_remote_code else list(HUB_PATTERNS)
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as e:  # offline, not found, gated, bad id: all mean "cannot get it"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QdyloraError(
            f"model.name_or_path={name_or_path!r} is no local directory and cannot be downloaded ({first})"
        ) from None


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in the order of its index."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return [model_dir / SAFETENSORS_SINGLE]
    raise QdyloraError(
        f"{model_dir} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}: qdylora reads safetensors "
        "checkpoints only (convert others with `save_pretrained(..., safe_serialization=True)`)"
    )


def read_shards(files: Sequence[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, one at a time, each file closed before the next opens."""
    for file in files:
        # safe_open maps the file; closing it unmaps the pages read so far.
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    yield key, tensor
        except (OSError, safetensors.SafetensorError) as e:  # a truncated or damaged download
            raise QdyloraError(f"{file}: unreadable weights ({str(e).splitlines()[0]}); download or save the model "
                               "again") from None


def prequantized_nf4(config: PretrainedConfig) -> bool:
    """Whether the checkpoint's linear weights are bitsandbytes NF4 (its config says so)."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return False
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("load_in_4bit") and q.get("bnb_4bit_quant_type", "fp4") == "nf4":
        return True
    raise QdyloraError(
        f"the checkpoint is quantized ({q.get('quant_method', 'unknown method')}) but not as bitsandbytes "
        "NF4 4-bit (load_in_4bit, bnb_4bit_quant_type: nf4); qdylora reads NF4 or float checkpoints"
    )


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword naming the dtype in `from_config`/`from_pretrained`: transformers 5 renamed `torch_dtype=`."""
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


# --- the skeleton --------------------------------------------------------------------------------------


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on `meta` (no memory) but their buffers for real.

    Unlike `with torch.device("meta")`, buffers computed in `__init__` (rotary frequencies, masks)
    keep their values, so nothing needs to recompute them after loading.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(config: PretrainedConfig, *, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of `config` with every parameter on `meta` (tied ones tied) and real buffers."""
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **dtype_kwarg(dtype))


# --- checkpoint names ------------------------------------------------------------------------------------

# A checkpoint key -> (the key transformers would load it as, the source pattern of the WeightConverter
# that would have to combine it with other tensors, or None).
KeyRenamer = Callable[[str], tuple[str, str | None]]


def checkpoint_key_renamer(model: PreTrainedModel) -> KeyRenamer:
    """How `from_pretrained` renames the checkpoint keys of `model`, one key at a time.

    transformers 5 keeps a mapping per architecture (`get_model_conversion_mapping`): renamings (GPT-NeoX
    checkpoints' `embed_out` is the module's `lm_head`, legacy `LayerNorm.gamma`, ...) and converters that
    build one parameter from several tensors (Mixtral's per-expert weights into one stacked tensor).
    Using that mapping rather than a table of ours keeps every architecture transformers knows loadable.
    transformers 4 has no such module: its modules and checkpoints share names, except for classes
    that declare `_checkpoint_conversion_mapping` (regex -> replacement, the first match applies, as
    in 4.x's `from_pretrained`).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x
        legacy = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})

        def rename_4x(key: str) -> tuple[str, str | None]:
            for pattern, replacement in legacy.items():
                renamed, count = re.subn(pattern, replacement, key)
                if count:
                    return renamed, None
            return key, None

        return rename_4x

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename_5x(key: str) -> tuple[str, str | None]:
        return rename_source_key(key, renamings, converters)

    return rename_5x


# --- filling it ----------------------------------------------------------------------------------------


class _Filler:
    """Puts tensors into a skeleton; target linear layers become NF4Linear as soon as they are complete.

    A linear layer is complete when its weight (float, or every bitsandbytes part) and its bias
    have arrived; until then its float weight waits here (checkpoints store a layer's tensors
    together, so at most a layer or two wait at any time).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        targets: set[str],
        *,
        dtype: torch.dtype,
        device: torch.device,
        quantize_device: torch.device,
        double_quant: bool,
        blocksize: int,
    ) -> None:
        self.model, self.targets, self.dtype = model, targets, dtype
        self.device, self.quantize_device = device, quantize_device
        self.double_quant, self.blocksize = double_quant, blocksize
        # Every (module, attribute) slot of each parameter: a tied parameter has several.
        self.slots: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    self.slots.setdefault(id(p), []).append((module, attr))
        self.names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        self.packed: dict[str, dict[str, torch.Tensor]] = {}  # layer -> its bitsandbytes parts so far
        self.keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.unexpected: list[str] = []
        self.rename = checkpoint_key_renamer(model)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        part = next((s for s in BNB_PARTS if key.endswith(".weight" + s)), None)
        name = self._name(key[: -len(part)] if part else key)
        if name is None:
            self.unexpected.append(key)
            return
        layer, _, attr = name.rpartition(".")
        module = self.model.get_submodule(layer)
        if isinstance(module, nn.Linear) and (part or tensor.dtype == torch.uint8):
            self.packed.setdefault(layer, {})[attr + (part or "")] = tensor
        elif attr == "weight" and layer in self.targets:  # quantized as soon as its bias is in too
            self._set_parameter(module, attr, tensor.to(self.quantize_device, self.dtype))
        elif attr in module._parameters:
            self._set_parameter(module, attr, self._cast(name, tensor))
        elif attr not in module._non_persistent_buffers_set:  # old checkpoints carry rotary inv_freq: skip it
            module._buffers[attr] = _owned(tensor, tensor.to(self.device, module._buffers[attr].dtype))
        if isinstance(self.model.get_submodule(layer), nn.Linear):
            self._quantize_if_complete(layer)

    def finish(self) -> None:
        """Quantize what is left (a target tied to a float weight), then check nothing is missing."""
        for layer in sorted(self.targets | set(self.packed)):
            if isinstance(self.model.get_submodule(layer), nn.Linear):
                self._quantize_if_complete(layer)
        if self.unexpected:
            log.warning("%d checkpoint tensors match nothing in the model and were skipped: %s",
                        len(self.unexpected), ", ".join(self.unexpected[:5]))
        missing = [n for n, p in self.model.named_parameters() if p.is_meta]
        missing += [f"{layer}.weight ({', '.join(sorted(parts))} only)" for layer, parts in self.packed.items()]
        if missing:
            raise QdyloraError(
                f"the checkpoint lacks {len(missing)} weights of this model, e.g. {', '.join(missing[:4])} "
                "(wrong config.json, or an incomplete download?)"
            )
        for buffer_owner in self.model.modules():  # buffers were computed on the CPU
            for attr, b in buffer_owner._buffers.items():
                if b is not None and b.device != self.device:
                    buffer_owner._buffers[attr] = b.to(self.device)

    def _name(self, key: str) -> str | None:
        """The parameter or buffer `key` fills: transformers' renaming of the key first, then our prefix
        resolution. A key the model has as it is stays itself when its renaming names nothing, as in
        `from_pretrained` (so in-memory state dicts, which use module names, pass through too)."""
        renamed, converter = self.rename(key)
        name = self._resolve(renamed)
        if name is None and (as_is := self._resolve(key)) is not None:
            name, converter = as_is, None
        if converter is not None:
            # A converter merges several checkpoint tensors into one parameter (or splits one): the
            # stream sees one tensor at a time and could only hold them all, defeating its purpose.
            raise QdyloraError(
                f"{self.model.config.model_type} checkpoints cannot be streamed: transformers builds "
                f"{renamed!r} from several tensors ({key!r} matches {converter!r}), and qdylora loads one tensor "
                "at a time"
            )
        return name

    def _resolve(self, key: str) -> str | None:
        """The model's name for `key`; checkpoints of the bare base model lack its prefix (`model.`)."""
        prefix = self.model.base_model_prefix
        for name in (key, f"{prefix}.{key}", key.removeprefix(prefix + ".")):
            if name in self.names:
                return name
        return None

    def _cast(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dtype = tensor.dtype
        if tensor.is_floating_point():
            dtype = torch.float32 if any(part in self.keep_fp32 for part in name.split(".")) else self.dtype
        return _owned(tensor, tensor.to(self.device, dtype))

    def _set_parameter(self, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        """Put `value` in every slot of the parameter at module.attr, so tied weights stay one parameter."""
        old = module._parameters[attr]
        new = nn.Parameter(value, requires_grad=False)
        slots = self.slots.pop(id(old), [(module, attr)])
        for owner, name in slots:
            owner._parameters[name] = new
        self.slots[id(new)] = slots

    def _quantize_if_complete(self, layer: str) -> None:
        linear = self.model.get_submodule(layer)
        bias_ready = linear.bias is None or not linear.bias.is_meta
        parts = self.packed.get(layer)
        if parts is not None:
            if not (bias_ready and _bnb_complete(parts)):
                return
            del self.packed[layer]
            quantized = _from_bnb_parts(linear, parts, self.dtype, layer)
        elif layer in self.targets and not linear.weight.is_meta and bias_ready:
            quantized = NF4Linear.from_linear(
                linear, double_quant=self.double_quant, compute_dtype=self.dtype, blocksize=self.blocksize
            )
        else:
            return
        parent, _, attr = layer.rpartition(".")
        quantized = quantized.to(self.device)
        if parts is not None:  # its tensors may still be views of the file
            quantized.weight, quantized.absmax = quantized.weight.clone(), quantized.absmax.clone()
        setattr(self.model.get_submodule(parent), attr, quantized)
        self.slots.pop(id(linear.weight), None)  # the float weight goes with the nn.Linear


def _owned(source: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result`, copied if it still shares memory with `source`: safetensors hands out views of the
    mapped file, which would keep the file mapped (and crash the run if the file changed on disk)."""
    return result.clone() if result.data_ptr() == source.data_ptr() else result


def _bnb_complete(parts: dict[str, torch.Tensor]) -> bool:
    state = parts.get("weight" + BNB_QUANT_STATE)
    if state is None:
        return False
    nested = "nested_offset" in json.loads(bytes(state.tolist()).decode())
    needed = ["weight", "weight.absmax", "weight.quant_map"] + ["weight.nested_absmax", "weight.nested_quant_map"] * nested
    return all(k in parts for k in needed)


def _from_bnb_parts(linear: nn.Linear, parts: dict[str, torch.Tensor], dtype: torch.dtype, layer: str) -> NF4Linear:
    """An NF4Linear holding a bitsandbytes-quantized weight as is (no dequantize/requantize round trip)."""
    info = json.loads(bytes(parts["weight" + BNB_QUANT_STATE].tolist()).decode())
    quantized = NF4Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        blocksize=info["blocksize"],
        double_quant="nested_offset" in info,
        device="meta",
    )
    # strict=False: the bias is not among the parts; it is the skeleton's, set just below.
    result = quantized.load_state_dict(parts, strict=False)
    missing = [k for k in result.missing_keys if k != "bias"]
    if missing:
        raise QdyloraError(f"{layer}: the bitsandbytes checkpoint lacks {', '.join(missing)}")
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return quantized


def fill_model(
    model: PreTrainedModel,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    quant: QuantConfig = NF4,
    target_modules: Sequence[str] = ("all-linear",),
    device: torch.device | str = "cpu",
    quantize_device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Fill a `build_skeleton` model from (name, tensor) pairs, quantizing the target layers on arrival.

    Float tensors are cast to `dtype` and put on `device`; target linear weights are quantized on
    `quantize_device` (default `device`; a GPU makes quantizing a CPU-resident model fast) and their
    float copy dropped. With quant.type `none` nothing is quantized. This is the one place where
    weights become NF4; the adapters come later (`inject_adapters` wraps the same targets).
    """
    if quant.type not in QUANT_TYPES:
        raise QdyloraError(f"quant.type {quant.type!r} is unknown; expected one of {', '.join(QUANT_TYPES)}")
    device = torch.device(device)
    targets = set(find_target_modules(model, target_modules)) if quant.type == "nf4" else set()
    filler = _Filler(
        model,
        targets,
        dtype=dtype,
        device=device,
        quantize_device=torch.device(quantize_device) if quantize_device is not None else device,
        double_quant=quant.double_quant,
        blocksize=quant.blocksize,
    )
    for key, tensor in tensors:
        filler.put(key, tensor)
        del tensor  # the float copy must not outlive its quantization
    filler.finish()
    if quant.type == "none" and any(isinstance(m, NF4Linear) for m in model.modules()):
        raise QdyloraError("the checkpoint holds NF4 weights (bitsandbytes 4-bit); use quant.type=nf4 with it")
    return model


def quantize_model(
    model: PreTrainedModel, *, quant: QuantConfig = NF4, target_modules: Sequence[str] = ("all-linear",),
    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    quantize_device: torch.device | str | None = None,
) -> PreTrainedModel:
    """The same model with its target layers in NF4, as if it had been read from disk (`fill_model`).

    For models that exist only in memory: built from a config, or made by a test.
    """
    dtype = dtype or next(model.parameters()).dtype
    device = device or next(model.parameters()).device
    skeleton = build_skeleton(model.config, dtype=dtype)
    return fill_model(skeleton, model.state_dict().items(), dtype=dtype, quant=quant, target_modules=target_modules,
                      device=device, quantize_device=quantize_device)


def load_quantized(
    name_or_path: str,
    *,
    dtype: torch.dtype,
    quant: QuantConfig = NF4,
    target_modules: Sequence[str] = ("all-linear",),
    device: torch.device | str | None = None,
    quantize_device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local directory or hub id, read shard by shard with its target layers in NF4.

    `device` defaults to CUDA when there is one. The result has no adapters yet.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = resolve_model_dir(name_or_path, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise QdyloraError(f"model.name_or_path={name_or_path!r}: no usable config.json ({str(e).splitlines()[0]})") from None
    if prequantized_nf4(config):
        log.info("%s holds bitsandbytes NF4 weights: loading them as they are", name_or_path)
        del config.quantization_config  # the model we build is ours, not a transformers-quantized one
    model = build_skeleton(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return fill_model(
        model,
        read_shards(shard_files(model_dir)),
        dtype=dtype,
        quant=quant,
        target_modules=target_modules,
        device=device,
        quantize_device=quantize_device,
    )


# --- random weights for benchmarks -----------------------------------------------------------------------


def random_tensors(
    model: PreTrainedModel, *, device: torch.device | str, seed: int = 0, std: float | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """A stand-in checkpoint for `fill_model`: one random tensor per parameter of a skeleton, made on `device`.

    Weights are N(0, std²) (default: the config's initializer_range), norms one, biases zero;
    only one tensor exists at a time, so a 40B-parameter model never needs its float size.
    """
    std = std if std is not None else getattr(model.config, "initializer_range", 0.02)
    generator = torch.Generator(device=device).manual_seed(seed)
    # Listed first: fill_model replaces modules while this generator is being consumed.
    specs = [(name, p.shape, p.dtype) for name, p in model.named_parameters()]
    for name, shape, dtype in specs:
        if name.endswith("bias"):
            yield name, torch.zeros(shape, dtype=dtype, device=device)
        elif len(shape) == 1:  # norm weights
            yield name, torch.ones(shape, dtype=dtype, device=device)
        else:
            yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)

