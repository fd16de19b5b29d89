"""Quantizing whole models: a tiny SD3Transformer2DModel, a tiny T5; backend choice; block compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.bench import build_transformer, make_inputs, relative_error
from engine.errors import Fp8Error
from engine.fp8 import (
    DEFAULT_KEEP_BF16,
    FP8_DTYPE,
    Fp8Linear,
    choose_backend,
    compile_blocks,
    prefers_per_channel,
    quantize_text_encoder,
    quantize_transformer,
    uncompile_blocks,
)


@pytest.fixture(scope="module")
def tiny():
    model = build_transformer("tiny", torch.device("cpu"), seed=0, dtype=torch.float32)
    inputs = make_inputs("tiny", torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        reference = model(**inputs).sample
    return model, inputs, reference


@pytest.mark.parametrize("backend", ["weight_only", "scaled_mm"])
def test_quantized_tiny_transformer_stays_close(tiny, backend):
    model, inputs, reference = tiny
    quantized = copy.deepcopy(model)
    report = quantize_transformer(quantized, backend, compute_dtype=torch.float32)
    with torch.no_grad():
        out = quantized(**inputs).sample
    assert relative_error(out, reference) < 0.03
    assert report.quantized and report.bytes_after < report.bytes_before
    assert all(isinstance(quantized.get_submodule(n), Fp8Linear) for n in report.quantized)


def test_sensitive_layers_stay_high_precision(tiny):
    model, _, _ = tiny
    quantized = copy.deepcopy(model)
    report = quantize_transformer(quantized, "weight_only")
    for name in ("context_embedder", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                 "time_text_embed.text_embedder.linear_2"):
        module = quantized.get_submodule(name)
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
        assert name in report.kept
    assert all(not n.startswith("transformer_blocks") for n in report.kept)
    block_linears = [m for n, m in quantized.transformer_blocks.named_modules() if isinstance(m, (nn.Linear, Fp8Linear))]
    assert block_linears and all(isinstance(m, Fp8Linear) and m.weight.dtype == FP8_DTYPE for m in block_linears)
    # Every transformer-block linear, adaLN modulation and the dual-attention block's attn2 included.
    assert "transformer_blocks.0.norm1.linear" in report.quantized
    assert "transformer_blocks.0.attn2.to_q" in report.quantized


def test_keep_bf16_patterns_extend_the_defaults(tiny):
    model, _, _ = tiny
    quantized = copy.deepcopy(model)
    report = quantize_transformer(quantized, "weight_only", keep_bf16=DEFAULT_KEEP_BF16 + ("*.norm1*.linear",))
    assert "transformer_blocks.1.norm1_context.linear" in report.kept
    assert type(quantized.transformer_blocks[0].norm1.linear) is nn.Linear


def test_text_encoder_t5_quantizes_but_keeps_wo():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    encoder = T5EncoderModel(config).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        reference = encoder(input_ids=ids).last_hidden_state
    report = quantize_text_encoder(encoder, compute_dtype=torch.float32)
    assert "encoder.block.0.layer.0.SelfAttention.q" in report.quantized
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in report.kept
    with torch.no_grad():
        out = encoder(input_ids=ids).last_hidden_state
    # Random T5 weights compound the rounding over layers: a few percent, not the transformer's 3 %.
    assert relative_error(out, reference) < 0.05


def test_choose_backend_on_cpu_falls_back_with_a_message():
    auto = choose_backend("auto", "cpu")
    assert auto.backend == "weight_only" and not auto.fp8_compute and "cpu" in auto.message
    asked = choose_backend("scaled_mm", "cpu")
    assert asked.backend == "weight_only" and asked.fell_back and "weight_only" in asked.message
    te = choose_backend("transformer_engine", "cpu")
    assert te.backend == "weight_only" and te.fell_back
    plain = choose_backend("weight_only", "cpu")
    assert plain.backend == "weight_only" and not plain.fell_back


def test_choose_backend_unknown_name_lists_the_valid_ones():
    with pytest.raises(Fp8Error) as info:
        choose_backend("fp4", "cpu")
    assert info.value.details["supported"] == ["auto", "scaled_mm", "transformer_engine", "weight_only"]


def test_compile_blocks_wires_every_block_and_raises_the_recompile_limit(tiny):
    import torch._dynamo.config as dynamo_config

    model = copy.deepcopy(tiny[0])
    assert compile_blocks(model) == len(model.transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
    assert dynamo_config.recompile_limit >= 64
    assert dynamo_config.fail_on_recompile_limit_hit is True
    assert "transformer_blocks.0.attn.to_q.weight" in model.state_dict()  # names unchanged
    uncompile_blocks(model)
    assert all(block._compiled_call_impl is None for block in model.transformer_blocks)


def test_compile_blocks_needs_transformer_blocks():
    with pytest.raises(Fp8Error, match="transformer_blocks"):
        compile_blocks(nn.Linear(4, 4))


def test_scaled_mm_layers_take_one_weight_scale_unless_a_channel_would_lose_precision():
    torch.manual_seed(3)
    even, skewed = nn.Linear(512, 48), nn.Linear(512, 48)
    with torch.no_grad():
        skewed.weight[4:] /= 30000.0  # most channels far below the first four: subnormals under one scale
    assert not prefers_per_channel(even.weight) and prefers_per_channel(skewed.weight)
    model = nn.Sequential(even, nn.GELU(), nn.Linear(48, 512), skewed)
    report = quantize_transformer(model, "scaled_mm", keep_bf16=(), compute_dtype=torch.float32)
    assert model[0].weight_scale.shape == () and model[3].weight_scale.shape == (48,)
    assert report.per_channel_layers == ["3"]
    # Other backends gain nothing from one scale per tensor: per channel throughout.
    model = nn.Sequential(nn.Linear(64, 48))
    assert quantize_transformer(model, "weight_only", keep_bf16=()).per_channel_layers == ["0"]
    # An explicit choice wins.
    model = nn.Sequential(nn.Linear(64, 48))
    quantize_transformer(model, "scaled_mm", per_channel=True, keep_bf16=())
    assert model[0].weight_scale.shape == (48,)


def test_per_tensor_default_keeps_the_tiny_transformer_as_close_as_per_channel(tiny):
    model, inputs, reference = tiny
    errors = {}
    for per_channel in (None, True):
        quantized = copy.deepcopy(model)
        quantize_transformer(quantized, "scaled_mm", per_channel=per_channel, compute_dtype=torch.float32)
        with torch.no_grad():
            errors[per_channel] = relative_error(quantized(**inputs).sample, reference)
    assert errors[None] < 0.03 and errors[None] <= 1.1 * errors[True]
