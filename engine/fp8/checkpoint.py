"""ComfyUI ``*_fp8_scaled.safetensors`` checkpoints: load into FP8 layers, save in that layout.

Two generations of the layout exist, both read here:

* legacy: ``<layer>.weight`` (float8_e4m3fn), ``<layer>.scale_weight``, optional ``<layer>.scale_input``
  (1.0 means "none"), and a ``scaled_fp8`` marker tensor (two elements: the file asks for BF16 matmuls);
* current: ``<layer>.weight``, ``<layer>.weight_scale``, optional ``<layer>.input_scale``, a per-layer
  ``<layer>.comfy_quant`` uint8 tensor holding JSON (``{"format": "float8_e4m3fn"}``) and/or a
  ``_quantization_metadata`` JSON entry in the safetensors metadata.

Naming: the loader works on **diffusers** names (``transformer_blocks.0.attn.to_q.weight``). SD3 files
use the original names (``model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight``, q/k/v fused);
:func:`convert_sd3_fp8_scaled_to_diffusers` renames them with diffusers' own converter and carries
every scale to the layer(s) its weight ends up in (a fused qkv scale goes to each of to_q/to_k/to_v).
So the model layer does::

    raw = safetensors.torch.load_file(path)                      # FP8 tensors stay FP8
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)  # no BF16 weights allocated
    report = load_fp8_scaled_into(transformer, convert_sd3_fp8_scaled_to_diffusers(raw), backend=...)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from engine.errors import Fp8Error
from engine.fp8.linear import FP8_DTYPE, Fp8Linear, check_backend_name
from engine.fp8.quantize import QuantizationReport, module_bytes, replace_module

ORIGINAL_PREFIX = "model.diffusion_model."
MARKER = "scaled_fp8"
SUPPORTED_FORMATS = ("float8_e4m3fn",)
_WEIGHT_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
_INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")
_QUANT_CONF_SUFFIX = ".comfy_quant"
_SCALE_SUFFIXES = _WEIGHT_SCALE_SUFFIXES + _INPUT_SCALE_SUFFIXES + (_QUANT_CONF_SUFFIX,)


def is_fp8_scaled(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bool:
    """True when ``state_dict`` (any naming) is in one of ComfyUI's scaled FP8 layouts."""
    if metadata and "_quantization_metadata" in metadata:
        return True
    markers = _WEIGHT_SCALE_SUFFIXES + (_QUANT_CONF_SUFFIX, "." + MARKER)
    return any(k == MARKER or k.endswith(markers) for k in state_dict)


def _decode_quant_conf(tensor: torch.Tensor) -> dict[str, Any]:
    try:
        return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Fp8Error(f"unreadable comfy_quant entry: {exc}") from exc


def _check_format(layer: str, conf: Mapping[str, Any]) -> bool:
    """Validate one layer's quant config; returns whether it asks for full-precision matmuls."""
    fmt = conf.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise Fp8Error(
            f"layer {layer} is quantized as {fmt!r}; supported: {', '.join(SUPPORTED_FORMATS)}",
            layer=layer,
            format=fmt,
            supported=list(SUPPORTED_FORMATS),
        )
    return bool(conf.get("full_precision_matrix_mult", False))


def _pop_first(state: dict[str, torch.Tensor], layer: str, suffixes: tuple[str, ...]) -> tuple[torch.Tensor | None, str]:
    """The first of ``layer + suffix`` present in ``state`` (removed), and which suffix it was."""
    for suffix in suffixes:
        if layer + suffix in state:
            return state.pop(layer + suffix), suffix
    return None, ""


def _is_placeholder_input_scale(value: torch.Tensor, suffix: str) -> bool:
    # Legacy files write scale_input = 1.0 for "no static scale".
    return suffix == ".scale_input" and float(value.reshape(-1)[0]) == 1.0


def convert_sd3_fp8_scaled_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an SD3 fp8_scaled transformer from the original naming to diffusers', scales included.

    Keys outside ``model.diffusion_model.`` (text encoders, VAE of an all-in-one file) are dropped
    when that prefix is present. FP8 weights are split/renamed as FP8 (no float copy). Output keys:
    ``<layer>.weight`` (FP8), ``<layer>.weight_scale``, ``<layer>.input_scale``, the other tensors, and
    ``scaled_fp8`` when the source had the marker. Load the result with :func:`load_fp8_scaled_into`.
    """
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: PLC0415

    if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
        state = {k[len(ORIGINAL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    else:
        state = dict(state_dict)
    marker = state.pop(MARKER, None)
    extras = {k: state.pop(k) for k in [k for k in state if k.endswith(_SCALE_SUFFIXES)]}
    quantized = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dtype == FP8_DTYPE]
    for layer in quantized:
        conf = extras.get(layer + _QUANT_CONF_SUFFIX)
        if conf is not None:
            _check_format(layer, _decode_quant_conf(conf))

    def column(key: str, value: torch.Tensor, fill: dict[str, torch.Tensor]) -> torch.Tensor:
        # A [rows, 1] stand-in: diffusers' converter only splits/reorders rows, so running it on
        # these columns tells where each row's scale ends up.
        rows = value.shape[0] if value.dim() else 1
        if key in fill:
            per_row = fill[key].to(torch.float32).reshape(-1)
            return per_row.expand(rows).reshape(rows, 1).clone() if per_row.numel() == 1 else per_row.reshape(rows, 1)
        return torch.full((rows, 1), math.nan)

    weight_scales, input_scales = {}, {}
    for layer in quantized:
        ws, _ = _pop_first(extras, layer, _WEIGHT_SCALE_SUFFIXES)
        weight_scales[layer + ".weight"] = ws if ws is not None else torch.tensor(1.0)  # bare FP8 cast
        inp, suffix = _pop_first(extras, layer, _INPUT_SCALE_SUFFIXES)
        if inp is not None and not _is_placeholder_input_scale(inp, suffix):
            input_scales[layer + ".weight"] = inp.reshape(-1)[:1]
    stray = [k for k in extras if not k.endswith(_QUANT_CONF_SUFFIX)]
    if stray:
        raise Fp8Error(f"scales without an FP8 weight: {', '.join(stray[:5])}", keys=stray[:20])
    probe_weight = {k: column(k, v, weight_scales) for k, v in state.items()}
    probe_input = {k: column(k, v, input_scales) for k, v in state.items()}

    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    weight_rows = convert_sd3_transformer_checkpoint_to_diffusers(probe_weight)
    input_rows = convert_sd3_transformer_checkpoint_to_diffusers(probe_input)

    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        out[key] = value
        if not (key.endswith(".weight") and value.dtype == FP8_DTYPE):
            continue
        layer = key[: -len(".weight")]
        rows = weight_rows[key].reshape(-1)
        out[layer + ".weight_scale"] = rows[0].clone() if bool((rows == rows[0]).all()) else rows.clone()
        first_input = input_rows[key].reshape(-1)[0]
        if not math.isnan(float(first_input)):
            out[layer + ".input_scale"] = first_input.clone()
    if marker is not None:
        out[MARKER] = marker
    return out


def load_fp8_scaled_into(
    transformer: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    backend: str = "weight_only",
    compute_dtype: torch.dtype = torch.bfloat16,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
) -> QuantizationReport:
    """Load a diffusers-named fp8_scaled state dict into ``transformer``, FP8 layers as FP8.

    Every linear whose weight is float8_e4m3fn becomes an :class:`Fp8Linear` wrapping that tensor
    (no float copy); the other tensors are assigned in ``compute_dtype``. Build ``transformer`` on
    the meta device so no BF16 weights ever exist. ``metadata`` is the safetensors header metadata
    (for ``_quantization_metadata``). With ``strict``, missing or unexpected keys raise.
    """
    check_backend_name(backend)
    state = dict(state_dict)
    report = QuantizationReport(backend=backend)
    marker = state.pop(MARKER, None)
    for key in [k for k in state if k.endswith("." + MARKER)]:
        marker = state.pop(key)
    full_precision = marker is not None and marker.numel() == 2
    file_layers: dict[str, Any] = {}
    if metadata and "_quantization_metadata" in metadata:
        file_layers = (json.loads(metadata["_quantization_metadata"]) or {}).get("layers", {}) or {}
    for layer, conf in file_layers.items():
        full_precision |= _check_format(layer, conf)

    fp8_weights = [k for k, v in state.items() if k.endswith(".weight") and v.dtype == FP8_DTYPE]
    other_fp8 = [k for k, v in state.items() if v.dtype in (FP8_DTYPE, torch.float8_e5m2) and k not in fp8_weights]
    if other_fp8:
        raise Fp8Error(
            f"FP8 tensors that are not E4M3 linear weights: {', '.join(other_fp8[:5])}; "
            f"supported: {', '.join(SUPPORTED_FORMATS)} linear weights",
            keys=other_fp8[:20],
        )
    for key in fp8_weights:
        layer = key[: -len(".weight")]
        weight = state.pop(key)
        weight_scale, _ = _pop_first(state, layer, _WEIGHT_SCALE_SUFFIXES)
        input_scale, suffix = _pop_first(state, layer, _INPUT_SCALE_SUFFIXES)
        if input_scale is not None and _is_placeholder_input_scale(input_scale, suffix):
            input_scale = None
        conf = state.pop(layer + _QUANT_CONF_SUFFIX, None)
        if conf is not None:
            full_precision |= _check_format(layer, _decode_quant_conf(conf))
        bias = state.pop(layer + ".bias", None)
        target = _target_linear(transformer, layer, weight.shape)
        new = Fp8Linear.from_fp8(
            weight,
            weight_scale if weight_scale is not None else torch.tensor(1.0),  # bare FP8 cast: scale 1
            None if bias is None else bias.to(compute_dtype),
            None if input_scale is None else input_scale.reshape(-1)[0],
            backend=backend,
            compute_dtype=compute_dtype,
        )
        del target
        replace_module(transformer, layer, new)
        report.quantized.append(layer)
        report.static_scales += new.input_scale is not None
    stray = [k for k in state if k.endswith(_SCALE_SUFFIXES)]
    if stray:
        raise Fp8Error(f"scales without an FP8 weight: {', '.join(stray[:5])}", keys=stray[:20])

    # Parameters take the compute dtype; buffers (SD3's float32 positional table) keep the file's.
    parameter_names = {name for name, _ in transformer.named_parameters()}
    rest = {k: (v.to(compute_dtype) if k in parameter_names and v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = transformer.load_state_dict(rest, strict=False, assign=True)
    replaced = set(report.quantized)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in replaced]  # loaded above, from FP8
    still_meta = [n for n, t in list(transformer.named_parameters()) + list(transformer.named_buffers()) if t.is_meta]
    if strict and (unexpected or missing or still_meta):
        problems = sorted(set(missing) | set(still_meta))
        raise Fp8Error(
            f"fp8_scaled state dict does not fit {type(transformer).__name__}: "
            f"missing {problems[:5]}, unexpected {sorted(unexpected)[:5]}",
            missing=problems[:20],
            unexpected=sorted(unexpected)[:20],
        )
    if full_precision:
        report.notes.append("the file asks for full-precision matmuls (weight_only compute)")
    report.kept = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    report.bytes_after = module_bytes(transformer)
    # What the same model would take with its FP8 weights in the compute dtype (scales aside).
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    report.bytes_before = sum(
        t.numel() * (itemsize if t.dtype == FP8_DTYPE else t.element_size())
        for k, t in transformer.state_dict().items()
        if not k.endswith(_SCALE_SUFFIXES)
    )
    return report


def _target_linear(transformer: nn.Module, layer: str, shape: torch.Size) -> nn.Module:
    try:
        module = transformer.get_submodule(layer)
    except AttributeError as exc:
        raise Fp8Error(f"the model has no layer {layer} for an FP8 weight", layer=layer) from exc
    if not isinstance(module, (nn.Linear, Fp8Linear)):
        raise Fp8Error(f"{layer} is a {type(module).__name__}, not a linear layer", layer=layer)
    expected = (module.out_features, module.in_features)
    if tuple(shape) != expected:
        raise Fp8Error(
            f"FP8 weight of {layer} has shape {tuple(shape)}, the model expects {expected}",
            layer=layer,
            shape=list(shape),
            expected=list(expected),
        )
    return module


def fp8_scaled_state_dict(transformer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata :func:`save_fp8_scaled` writes (diffusers naming)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, Fp8Linear):
            if module.backend == "transformer_engine":
                raise Fp8Error(
                    f"{name} is a Transformer Engine layer; save from a scaled_mm or weight_only model",
                    layer=name,
                )
            tensors[f"{name}{_QUANT_CONF_SUFFIX}"] = module.comfy_quant_tensor()
            layers[name] = module.comfy_quant_config()
    storages: set[int] = set()
    for key, value in transformer.state_dict().items():
        tensor = value.detach().cpu()
        storage = tensor.untyped_storage()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes
        if not whole or storage.data_ptr() in storages:
            # A slice of a larger tensor (fused q/k/v projections hold their weights as row slices of one):
            # written as a tensor of its own, since safetensors refuses tensors that share memory.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    metadata = {
        "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers}),
        "format": "pt",
        "naming": "diffusers",
    }
    return tensors, metadata


def save_fp8_scaled(transformer: nn.Module, path: str | Path, *, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write a quantized transformer as an fp8_scaled safetensors file (diffusers names, ComfyUI scale keys)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors, metadata = fp8_scaled_state_dict(transformer)
    if not any(k.endswith(_QUANT_CONF_SUFFIX) for k in tensors):
        raise Fp8Error("the model has no FP8 layers to save; quantize it first")
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_fp8_scaled_file(
    transformer: nn.Module, path: str | Path, *, backend: str = "weight_only", compute_dtype: torch.dtype = torch.bfloat16
) -> QuantizationReport:
    """Read ``path`` (diffusers or original SD3 naming) and load it with :func:`load_fp8_scaled_into`."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        # Copied out of the memory map: the FP8 weights go into the layers as they are, and a file replaced
        # under a resident model must not change or crash it.
        raw = {key: tensor.clone() for key, tensor in load_file(str(path)).items()}
    except Exception as exc:
        raise Fp8Error(f"cannot read fp8_scaled checkpoint {path}: {exc}", path=str(path)) from exc
    if any(k.startswith(ORIGINAL_PREFIX) or k.startswith("joint_blocks.") for k in raw):
        raw = convert_sd3_fp8_scaled_to_diffusers(raw)
    return load_fp8_scaled_into(transformer, raw, backend=backend, compute_dtype=compute_dtype, metadata=metadata)
