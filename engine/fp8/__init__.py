"""FP8 E4M3 inference for SD3 transformers (diffusers ``SD3Transformer2DModel``) and text encoders.

Typical use (the model layer does this when a checkpoint loads)::

    from engine.fp8 import choose_backend, quantize_transformer, compile_blocks, find_sidecar, fuse_qkv_projections

    choice = choose_backend(settings.fp8_backend, device)       # message set when it fell back
    scales = find_sidecar(checkpoint_path, checkpoint_sha)      # None, or calibrated input scales
    report = quantize_transformer(transformer, choice.backend, scales=scales)
    transformer.to(device)                                      # FP8 buffers keep their dtype
    if choice.backend == "scaled_mm":
        fuse_qkv_projections(transformer)                       # one GEMM per attention's q/k/v
    if choice.fp8_compute:
        compile_blocks(transformer)                             # FP8 pays only compiled

ComfyUI ``*_fp8_scaled.safetensors`` files load straight into FP8 layers with
``load_fp8_scaled_into(transformer, convert_sd3_fp8_scaled_to_diffusers(raw_state_dict))``
(or ``load_fp8_scaled_file``); ``save_fp8_scaled`` writes one. Calibration: ``calibrate`` +
``save_sidecar``/``load_sidecar``; ``calibrate_checkpoint`` is the whole ``python app.py calibrate`` job.

The model cache applies all of this through :class:`PrecisionPolicy` (its ``transformer_postprocess``),
built from the settings by ``engine.runtime.build_model_cache``; the precision string it returns
(``fp8_e4m3fn/scaled_mm/static``, ``fp8_e4m3fn/weight_only``, ``bf16``...) is recorded with every
generation. Every failure raises :class:`engine.errors.Fp8Error`.

This package imports torch; only the execution path imports it.
"""

from engine.fp8.backends import (
    BACKEND_CHOICES,
    BackendChoice,
    choose_backend,
    compile_blocks,
    fp8_compute_problem,
    transformer_engine_available,
    uncompile_blocks,
)
from engine.fp8.calibrate import (
    DEFAULT_PROMPTS_PATH,
    CalibrationResult,
    calibrate,
    calibrate_checkpoint,
    load_calibration_prompts,
    make_prompt_runner,
)
from engine.fp8.checkpoint import (
    convert_sd3_fp8_scaled_to_diffusers,
    is_fp8_scaled,
    load_fp8_scaled_file,
    load_fp8_scaled_into,
    save_fp8_scaled,
)
from engine.fp8.fused import FusedQkv, fuse_qkv_projections, fused_qkv_layers, unfuse_qkv_projections
from engine.fp8.linear import BACKENDS, E4M3_MAX, FP8_DTYPE, Fp8Linear, quantize_weight
from engine.fp8.policy import (
    PRECISIONS,
    PrecisionPolicy,
    check_precision_settings,
    fp8_precision_string,
    sidecar_location,
)
from engine.fp8.quantize import (
    DEFAULT_KEEP_BF16,
    DEFAULT_TEXT_ENCODER_KEEP,
    QuantizationReport,
    apply_activation_scales,
    clear_activation_scales,
    fp8_layers,
    prefers_per_channel,
    quantize_text_encoder,
    quantize_transformer,
    set_backend,
)
from engine.fp8.sidecar import (
    SIDECAR_SUFFIX,
    checkpoint_sha256,
    find_sidecar,
    load_sidecar,
    save_sidecar,
    sidecar_path_for,
)

__all__ = [
    # layer
    "Fp8Linear",
    "FP8_DTYPE",
    "E4M3_MAX",
    "BACKENDS",
    "quantize_weight",
    # whole models
    "quantize_transformer",
    "quantize_text_encoder",
    "QuantizationReport",
    "DEFAULT_KEEP_BF16",
    "DEFAULT_TEXT_ENCODER_KEEP",
    "fp8_layers",
    "prefers_per_channel",
    "apply_activation_scales",
    "clear_activation_scales",
    "set_backend",
    # fused q/k/v projections (scaled_mm)
    "FusedQkv",
    "fuse_qkv_projections",
    "unfuse_qkv_projections",
    "fused_qkv_layers",
    # hardware
    "BACKEND_CHOICES",
    "BackendChoice",
    "choose_backend",
    "fp8_compute_problem",
    "transformer_engine_available",
    "compile_blocks",
    "uncompile_blocks",
    # precision policy (the model cache's hook)
    "PRECISIONS",
    "PrecisionPolicy",
    "check_precision_settings",
    "fp8_precision_string",
    "sidecar_location",
    # calibration and sidecars
    "calibrate",
    "calibrate_checkpoint",
    "CalibrationResult",
    "make_prompt_runner",
    "load_calibration_prompts",
    "DEFAULT_PROMPTS_PATH",
    "SIDECAR_SUFFIX",
    "sidecar_path_for",
    "checkpoint_sha256",
    "save_sidecar",
    "load_sidecar",
    "find_sidecar",
    # fp8_scaled checkpoints
    "is_fp8_scaled",
    "convert_sd3_fp8_scaled_to_diffusers",
    "load_fp8_scaled_into",
    "load_fp8_scaled_file",
    "save_fp8_scaled",
]
