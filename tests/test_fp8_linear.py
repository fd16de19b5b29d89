"""Fp8Linear: E4M3 weights, per-tensor/per-channel scales, dynamic/static activations, backends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.bench import relative_error
from engine.errors import Fp8Error
from engine.fp8 import FP8_DTYPE, Fp8Linear, quantize_weight


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 48)


@pytest.mark.parametrize("backend", ["weight_only", "scaled_mm"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_linear_close_to_float_linear(linear, backend, per_channel):
    x = torch.randn(2, 40, 64)
    layer = Fp8Linear.from_linear(linear, backend=backend, per_channel=per_channel, compute_dtype=torch.float32)
    assert layer.weight.dtype == FP8_DTYPE
    assert layer.weight_scale.shape == ((48,) if per_channel else ())
    out = layer(x)
    assert out.shape == (2, 40, 48) and out.dtype == torch.float32
    assert relative_error(out, linear(x)) < 0.05


def test_scaled_mm_pads_rows_and_matches_weight_only(linear):
    # 21 rows: not a multiple of 16, as the 333-token text stream of SD3.
    x = torch.randn(21, 64, dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, backend="scaled_mm", compute_dtype=torch.bfloat16)
    fp8_gemm = layer(x)
    layer.set_backend("weight_only")
    upcast = layer(x)
    assert fp8_gemm.shape == (21, 48) and fp8_gemm.dtype == torch.bfloat16
    # Both use the same FP8 weights; scaled_mm also quantizes the activations.
    assert relative_error(fp8_gemm, upcast) < 0.05
    assert relative_error(fp8_gemm, linear(x.float())) < 0.05


def test_per_channel_beats_per_tensor_on_skewed_weights():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[:4] *= 200.0  # a few output channels with a much larger range
    errors = {}
    for per_channel in (True, False):
        layer = Fp8Linear.from_linear(linear, backend="weight_only", per_channel=per_channel, compute_dtype=torch.float32)
        errors[per_channel] = relative_error(layer.dequantized_weight(torch.float32)[4:], linear.weight[4:])
    assert errors[True] <= errors[False]
    assert errors[True] < 0.05


def test_static_input_scale_is_used(linear):
    x = torch.randn(16, 64)
    layer = Fp8Linear.from_linear(linear, backend="scaled_mm", compute_dtype=torch.float32)
    dynamic = layer(x)
    assert layer.activation_scaling == "dynamic"
    layer.set_input_scale(x.abs().amax() / 448)
    assert layer.activation_scaling == "static" and "input_scale" in layer.state_dict()
    assert relative_error(layer(x), dynamic) < 1e-3
    # A calibrated range 10x too small saturates most inputs: the static scale really is in use.
    layer.set_input_scale(x.abs().amax() / 4480)
    assert relative_error(layer(x), dynamic) > 0.2


def test_module_to_dtype_keeps_fp8_weights(linear):
    layer = Fp8Linear.from_linear(linear, backend="weight_only", compute_dtype=torch.float32)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FP8_DTYPE
    assert layer.weight_scale.dtype == torch.float32
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(3, 64)).dtype == torch.bfloat16


def test_quantize_weight_saturates_and_scales():
    weight = torch.tensor([[1.0, -2.0, 4.0], [0.0, 0.0, 0.0]])
    fp8, scale = quantize_weight(weight, per_channel=True)
    assert scale[0].item() == pytest.approx(4.0 / 448)
    assert scale[1].item() > 0  # an all-zero row must not divide by zero
    assert torch.equal(fp8[1].float(), torch.zeros(3))
    assert fp8.float().abs().max().item() == 448.0


def test_unknown_backend_names_the_supported_ones(linear):
    with pytest.raises(Fp8Error) as info:
        Fp8Linear.from_linear(linear, backend="int8")
    assert "scaled_mm" in info.value.message and "weight_only" in info.value.message
    assert info.value.details["supported"] == ["scaled_mm", "transformer_engine", "weight_only"]


def test_transformer_engine_backend_without_te_is_a_clear_error(linear):
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(Fp8Error, match="Transformer Engine"):
            Fp8Linear.from_linear(linear, backend="transformer_engine")
    else:
        pytest.skip("Transformer Engine is installed here")


def test_from_fp8_rejects_float_weights_and_bad_scale_shapes():
    with pytest.raises(Fp8Error, match="float8_e4m3fn"):
        Fp8Linear.from_fp8(torch.randn(8, 16), torch.tensor(1.0))
    with pytest.raises(Fp8Error, match="per-output-channel"):
        Fp8Linear.from_fp8(torch.zeros(8, 16, dtype=FP8_DTYPE), torch.ones(3))
