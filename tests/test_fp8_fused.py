"""Fused q/k/v projections for the scaled_mm FP8 backend (engine/fp8/fused.py) on a tiny SD3.5-shaped model.

The tiny model (engine.bench.TINY_CONFIG: widths 64, QK RMS norms, a dual-attention first block, a
context-pre-only last block, 21 text tokens so the FP8 GEMM pads its rows) has five q/k/v triples: the image
and text projections of both blocks' ``attn`` and the image projections of block 0's ``attn2``. On a CPU
``torch._scaled_mm`` runs for real, so the fused path computes here what it computes on a GPU.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from engine.bench import build_transformer, make_inputs, relative_error
from engine.errors import Fp8Error
from engine.fp8 import (
    BackendChoice,
    Fp8Linear,
    PrecisionPolicy,
    apply_activation_scales,
    calibrate,
    compile_blocks,
    fp8_layers,
    quantize_transformer,
    save_fp8_scaled,
    set_backend,
    uncompile_blocks,
)
from engine.fp8.fused import (
    FusedJointAttnProcessor,
    FusedQkv,
    fuse_qkv_projections,
    fused_qkv_layers,
    qkv_triples,
    unfuse_qkv_projections,
)
from engine.fp8.quantize import module_bytes, shared_qkv_scales
from engine.lora import LoraPatch, parse_lora_state_dict
from engine.models.cache import LoadedTransformer
from engine.settings import Settings, load_settings

CPU = torch.device("cpu")
TRIPLES = 5
QKV_LAYERS = {
    f"transformer_blocks.{block}.{attn}.{proj}"
    for block, attn, projs in (
        (0, "attn", ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")),
        (0, "attn2", ("to_q", "to_k", "to_v")),
        (1, "attn", ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")),
    )
    for proj in projs
}


@pytest.fixture(scope="module")
def tiny():
    model = build_transformer("tiny", CPU, seed=0, dtype=torch.float32)
    return model, make_inputs("tiny", CPU, dtype=torch.float32)


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def timestep_runner(model, inputs):
    def run(timestep: str) -> None:
        forward(model, inputs | {"timestep": torch.full_like(inputs["timestep"], float(timestep))})

    return run


def quantized(tiny, per_channel=None, static=True, dtype=torch.float32):
    """A scaled_mm FP8 copy of the tiny model, with calibrated (static) activation scales by default."""
    model, inputs = tiny
    model = copy.deepcopy(model)
    if dtype != torch.float32:
        model.to(dtype)
    quantize_transformer(model, "scaled_mm", per_channel=per_channel, compute_dtype=dtype)
    if static:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        apply_activation_scales(model, calibrate(model, timestep_runner(model, inputs), ["999", "500"]).scales)
    return model


def record_forward_calls(monkeypatch, cls) -> list:
    """The ``cls`` modules that ran a forward, in call order (eager runs only)."""
    calls = []
    original = cls.forward

    def recording(self, x):
        calls.append(self)
        return original(self, x)

    monkeypatch.setattr(cls, "forward", recording)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """The FusedQkv layers that ran a forward, in call order (eager runs only)."""
    return record_forward_calls(monkeypatch, FusedQkv)


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers (views count once)."""
    storages = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ------------------------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("per_channel", [None, False, True], ids=["default-scales", "per-tensor", "per-channel"])
def test_fused_model_computes_what_the_unfused_one_does(tiny, per_channel, monkeypatch):
    model = quantized(tiny, per_channel)
    inputs = tiny[1]
    reference = forward(model, inputs)

    assert fuse_qkv_projections(model) == TRIPLES
    assert set(fused_qkv_layers(model)) == {
        "transformer_blocks.0.attn.fused_qkv", "transformer_blocks.0.attn.fused_added_qkv",
        "transformer_blocks.0.attn2.fused_qkv",
        "transformer_blocks.1.attn.fused_qkv", "transformer_blocks.1.attn.fused_added_qkv",
    }
    called = record_forward_calls(monkeypatch, Fp8Linear)
    out = forward(model, inputs)
    names = {layer: name for name, layer in fp8_layers(model).items()}
    # The fused GEMMs stood in for every q/k/v projection; every other FP8 layer ran as before.
    assert {names[layer] for layer in called} == set(names.values()) - QKV_LAYERS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert fuse_qkv_projections(model) == 0  # fused already


def test_fused_bf16_model_matches_unfused(tiny):
    model = quantized(tiny, dtype=torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny[1].items()}
    reference = forward(model, inputs)
    fuse_qkv_projections(model)
    out = forward(model, inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, rtol=0.0, atol=1e-2)
    assert relative_error(out, reference) < 1e-3


def _triples(model):
    return [[model.get_submodule(name) for name in triple] for triple in qkv_triples(fp8_layers(model))]


@pytest.mark.slow
def test_compiled_fused_blocks_quantize_once_per_triple_and_see_loras(tiny):
    """With compile_blocks (Inductor on the CPU), a fused block still computes the unfused result, and a
    LoRA on to_q applied after compilation is seen.

    Proof that the compiled code really runs one GEMM per triple: the fused layer quantizes its input once,
    with the largest of the three layers' static scales. Giving each to_q three times its calibrated scale
    (not a power of two, which E4M3 would absorb exactly) makes that observable: the fused output must match the unfused model whose k and v use q's scale too, and
    must not match the unfused model with the three scales as they are.
    """
    model = quantized(tiny)
    inputs = tiny[1]
    for q, _, _ in _triples(model):
        q.set_input_scale(q.input_scale * 3)
    separate_scales = forward(model, inputs)
    one_scale = copy.deepcopy(model)
    for q, k, v in _triples(one_scale):
        k.set_input_scale(q.input_scale)
        v.set_input_scale(q.input_scale)
    expected = forward(one_scale, inputs)
    assert relative_error(expected, separate_scales) > 1e-4  # the two are told apart

    fuse_qkv_projections(model)
    compile_blocks(model)
    try:
        out = forward(model, inputs)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        assert relative_error(out, separate_scales) > 1e-4

        generator = torch.Generator().manual_seed(5)
        lora = parse_lora_state_dict({
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=generator),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=generator),
        }, "q-only")
        with LoraPatch.of(lora, 0.5, "model").applied(model):
            patched = forward(model, inputs)
        with LoraPatch.of(lora, 0.5, "model").applied(one_scale):
            expected_patched = forward(one_scale, inputs)
        assert relative_error(patched, out) > 1e-3
        torch.testing.assert_close(patched, expected_patched, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(forward(model, inputs), out, rtol=0.0, atol=0.0)  # LoRA gone again
    finally:
        uncompile_blocks(model)


def test_dual_attention_block_fuses_attn2(tiny, fused_calls):
    model = quantized(tiny)
    block = model.transformer_blocks[0]
    assert block.attn2 is not None and type(block.attn2.processor) is not FusedJointAttnProcessor
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = block.attn2(x)
        fuse_qkv_projections(model)
        assert isinstance(block.attn2.processor, FusedJointAttnProcessor)
        assert block.attn2.fused_qkv.parts == (block.attn2.to_q, block.attn2.to_k, block.attn2.to_v)
        assert not hasattr(block.attn2, "fused_added_qkv")  # attn2 has no text stream
        out = block.attn2(x)
    assert fused_calls == [block.attn2.fused_qkv]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- LoRA


def test_lora_on_to_q_changes_only_q_and_matches_the_unfused_model(tiny, fused_calls):
    model = quantized(tiny)
    unfused = copy.deepcopy(model)
    fuse_qkv_projections(model)
    generator = torch.Generator().manual_seed(3)
    lora = parse_lora_state_dict({
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=generator),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=generator),
    }, "q-only")
    fused = model.transformer_blocks[0].attn.fused_qkv
    x = torch.randn(2, 9, 64, generator=generator)
    with torch.no_grad():
        base = fused(x)
        with LoraPatch.of(lora, 0.7, "model").applied(model):
            q, k, v = fused(x)
            fused_calls.clear()
            out = forward(model, tiny[1])
            assert fused in fused_calls and len(fused_calls) == TRIPLES  # the LoRA did not turn fusion off
        with LoraPatch.of(lora, 0.7, "model").applied(unfused):
            expected_q = unfused.transformer_blocks[0].attn.to_q(x)
            expected_out = forward(unfused, tiny[1])
        after = fused(x)
    assert torch.equal(k, base[1]) and torch.equal(v, base[2])
    assert relative_error(q, base[0]) > 0.01
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(after, base))


# ------------------------------------------------------------------------------ names, bytes, memory


@pytest.mark.parametrize("per_channel", [None, True], ids=["default-scales", "per-channel"])
def test_fusion_adds_no_state_dict_key_and_changes_no_byte(tiny, per_channel):
    model = quantized(tiny, per_channel)
    before = {key: (value.dtype, tuple(value.shape), raw(value)) for key, value in model.state_dict().items()}
    fuse_qkv_projections(model)
    after = {key: (value.dtype, tuple(value.shape), raw(value)) for key, value in model.state_dict().items()}
    assert list(after) == list(before)
    assert after == before


def _safetensors_parts(path):
    """(header as parsed JSON, tensor data bytes) of a safetensors file."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def test_fp8_scaled_file_saved_after_fusion_is_the_one_saved_before(tiny, tmp_path):
    model = quantized(tiny)
    before = save_fp8_scaled(model, tmp_path / "before.safetensors")
    fuse_qkv_projections(model)
    after = save_fp8_scaled(model, tmp_path / "after.safetensors")
    # Compared parsed: safetensors writes its metadata map in no fixed order, even for one model saved twice.
    header_before, data_before = _safetensors_parts(before)
    header_after, data_after = _safetensors_parts(after)
    assert header_after == header_before
    assert data_after == data_before


def test_fusion_allocates_no_weight_memory_and_moves_keep_the_views(tiny):
    model = quantized(tiny)
    bytes_before = storage_bytes(model)
    fuse_qkv_projections(model)
    assert storage_bytes(model) <= bytes_before
    assert module_bytes(model) == storage_bytes(model)

    def shares(model) -> bool:
        for fused in fused_qkv_layers(model).values():
            pointer = fused.weight.untyped_storage().data_ptr()
            for layer in fused.parts:
                if layer.weight.untyped_storage().data_ptr() != pointer:
                    return False
                if layer.bias.untyped_storage().data_ptr() != fused.bias.untyped_storage().data_ptr():
                    return False
        return True

    assert shares(model)
    unfused = copy.deepcopy(model)
    unfuse_qkv_projections(unfused)
    model.to(torch.bfloat16)  # FP8 weights keep their dtype; views must survive the move
    unfused.to(torch.bfloat16)
    assert shares(model)
    assert all(f.weight.dtype == torch.float8_e4m3fn and f.bias.dtype == torch.bfloat16
               for f in fused_qkv_layers(model).values())
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny[1].items()}
    torch.testing.assert_close(forward(model, inputs), forward(unfused, inputs), rtol=0.0, atol=1e-2)


# ------------------------------------------------------------------------------------ weight scales


def test_quantizing_for_scaled_mm_gives_each_triple_one_decision_and_one_scale(tiny):
    for per_channel in (None, False, True):
        model = quantized(tiny, per_channel, static=False)
        for triple in _triples(model):
            assert len({layer.per_channel for layer in triple}) == 1
            if not triple[0].per_channel:
                assert torch.equal(triple[0].weight_scale, triple[1].weight_scale)
                assert torch.equal(triple[0].weight_scale, triple[2].weight_scale)
        assert all(f.requantized == 0 for f in _fused_now(model))


def _fused_now(model):
    fuse_qkv_projections(model)
    return list(fused_qkv_layers(model).values())


def _linears(ranges, seed=0, width=256):
    torch.manual_seed(seed)
    layers = []
    for factor in ranges:
        layer = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            layer.weight.mul_(factor)
        layers.append(layer.requires_grad_(False))
    return layers


def _weight_error(layer: Fp8Linear, reference: torch.Tensor) -> float:
    return relative_error(layer.dequantized_weight(torch.float32), reference)


def test_a_shared_scale_costs_a_smaller_layer_little(tiny):
    """Error effect of quantizing q/k/v with one per-tensor scale (what quantize_transformer does for
    scaled_mm) instead of one each: for k and v with 10x and 100x smaller weights than q, the relative weight
    error grows from 2.56 % to 2.72-2.73 % (about 6 %); E4M3 keeps its relative precision, so only values
    pushed into its subnormal range lose. Power-of-two range ratios cost nothing at all."""
    floats = _linears((1.0, 0.1, 0.01))
    holder = nn.Module()
    holder.to_q, holder.to_k, holder.to_v = floats
    decisions = shared_qkv_scales(holder, ["to_q", "to_k", "to_v"], per_channel=False)
    shared = decisions["to_q"][1]
    assert all(decisions[name][0] is False and decisions[name][1] is shared for name in ("to_q", "to_k", "to_v"))
    own = [_weight_error(Fp8Linear.from_linear(f, per_channel=False), f.weight) for f in floats]
    common = [_weight_error(Fp8Linear.from_linear(f, per_channel=False, weight_scale=shared), f.weight)
              for f in floats]
    assert common[0] == own[0]  # q's own scale is the shared one
    for mine, theirs in zip(own[1:], common[1:]):
        assert mine < theirs < 1.08 * mine
    with pytest.raises(Fp8Error, match="per tensor"):
        Fp8Linear.from_linear(floats[0], per_channel=True, weight_scale=shared)


def test_differing_per_tensor_scales_are_requantized_to_the_largest():
    """Error effect of fusing FP8 layers quantized one by one (an FP8 file from elsewhere): the layers with
    the smaller scales are rounded a second time, onto the largest scale's grid. For k and v 10x and 100x
    smaller than q, their relative weight error grows from 2.56 % to 3.73-3.79 % (about 1.5x); q is untouched;
    power-of-two ratios requantize exactly but for values below E4M3's smallest subnormal. Layers quantized for scaled_mm here never take this path (their
    triples share one scale), and ComfyUI's fp8_scaled files store q/k/v as one tensor with one scale."""
    floats = _linears((1.0, 0.1, 0.01))
    layers = [Fp8Linear.from_linear(f, backend="scaled_mm", per_channel=False) for f in floats]
    q_bytes = raw(layers[0].weight)
    own = [_weight_error(layer, f.weight) for layer, f in zip(layers, floats)]
    fused = FusedQkv(layers)
    assert fused.requantized == 2
    assert fused.weight_scale.dim() == 0 and all(torch.equal(layer.weight_scale, fused.weight_scale)
                                                  for layer in layers)
    after = [_weight_error(layer, f.weight) for layer, f in zip(layers, floats)]
    assert raw(layers[0].weight) == q_bytes and after[0] == own[0]
    for before, requantized in zip(own[1:], after[1:]):
        assert before < requantized < 1.6 * before
    x = torch.randn(33, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for out, layer in zip(fused(x), layers):
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)  # the layers see the new bytes

    # One weight at 1, 1/2 and 1/8 of its size: scales in power-of-two ratios, where requantizing only moves
    # the exponent; values that fall below E4M3's smallest subnormal are all that change.
    base = _linears((1.0,))[0]
    halved = [copy.deepcopy(base) for _ in range(3)]
    for layer, factor in zip(halved, (1.0, 0.5, 0.125)):
        layer.weight.mul_(factor)
    layers = [Fp8Linear.from_linear(f, backend="scaled_mm", per_channel=False) for f in halved]
    before = [layer.dequantized_weight(torch.float32) for layer in layers]
    assert FusedQkv(layers).requantized == 2
    for layer, old, f in zip(layers, before, halved):
        new = layer.dequantized_weight(torch.float32)
        assert (new != old).float().mean() < 1e-3
        assert _weight_error(layer, f.weight) == pytest.approx(relative_error(old, f.weight), rel=1e-4)


def test_mixed_weight_scales_fuse_exactly_per_row():
    # In BF16, as in production: a per-channel GEMM always writes BF16, so that is what both sides compute in.
    floats = _linears((1.0, 0.1, 1.0))
    layers = [Fp8Linear.from_linear(f, backend="scaled_mm", per_channel=pc, compute_dtype=torch.bfloat16)
              for f, pc in zip(floats, (True, False, True))]
    before = [(raw(layer.weight), raw(layer.weight_scale)) for layer in layers]
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        fused = FusedQkv(layers)
        outputs = fused(x)
    assert fused.requantized == 0 and fused.weight_scale.shape == (768,)
    assert [(raw(layer.weight), raw(layer.weight_scale)) for layer in layers] == before
    for out, reference in zip(outputs, expected):
        torch.testing.assert_close(out, reference, rtol=0.0, atol=0.0)


def test_layers_that_cannot_share_a_gemm_are_refused():
    a, b = nn.Linear(32, 16), nn.Linear(48, 16)
    with pytest.raises(Fp8Error, match="input widths differ"):
        FusedQkv([Fp8Linear.from_linear(a, backend="scaled_mm"), Fp8Linear.from_linear(b, backend="scaled_mm"),
                  Fp8Linear.from_linear(a, backend="scaled_mm")])
    with pytest.raises(Fp8Error, match="scaled_mm"):
        FusedQkv([Fp8Linear.from_linear(a, backend="weight_only") for _ in range(3)])


# ------------------------------------------------------------ when the fused GEMM steps aside


def test_calibration_of_a_fused_model_sees_every_projection(tiny):
    model = quantized(tiny, static=False)
    unfused_scales = calibrate(model, timestep_runner(model, tiny[1]), ["999", "500"]).scales
    fuse_qkv_projections(model)
    result = calibrate(model, timestep_runner(model, tiny[1]), ["999", "500"])
    assert not result.uncovered
    assert set(result.scales) == set(unfused_scales)
    for name, scale in unfused_scales.items():
        torch.testing.assert_close(result.scales[name], scale, rtol=1e-6, atol=0.0)


def test_other_backends_and_unfusing_run_the_three_layers(tiny, fused_calls):
    calls = fused_calls
    model = quantized(tiny)
    unfused_out = forward(model, tiny[1])
    fuse_qkv_projections(model)

    set_backend(model, "weight_only")
    weight_only = copy.deepcopy(model)
    unfuse_qkv_projections(weight_only)
    torch.testing.assert_close(forward(model, tiny[1]), forward(weight_only, tiny[1]), rtol=0.0, atol=0.0)
    assert not calls  # weight_only is not fused

    set_backend(model, "scaled_mm")
    forward(model, tiny[1])
    assert len(calls) == TRIPLES
    assert unfuse_qkv_projections(model) == TRIPLES
    assert not fused_qkv_layers(model)
    assert all(type(m.processor).__name__ == "JointAttnProcessor2_0" for m in model.modules() if hasattr(m, "processor"))
    calls.clear()
    torch.testing.assert_close(forward(model, tiny[1]), unfused_out, rtol=1e-5, atol=1e-5)
    assert not calls


# ------------------------------------------------------------------------------ setting and policy


def _grant_scaled_mm(requested, device):
    backend = "scaled_mm" if requested == "auto" else requested
    return BackendChoice(backend, requested, str(device), fp8_compute=backend != "weight_only")


@pytest.mark.parametrize(("fuse", "backend", "fused"), [
    (True, "scaled_mm", TRIPLES), (False, "scaled_mm", 0), (True, "weight_only", 0),
])
def test_precision_policy_fuses_scaled_mm_models_unless_switched_off(tiny, tmp_path, fuse, backend, fused):
    policy = PrecisionPolicy("fp8", backend, compile=False, data_dir=tmp_path, choose=_grant_scaled_mm, fuse_qkv=fuse)
    loaded = policy(LoadedTransformer(copy.deepcopy(tiny[0]), "tiny", None, "default", "fp32"))
    assert len(fused_qkv_layers(loaded.transformer)) == fused
    assert loaded.precision == f"fp8_e4m3fn/{backend}" + ("/dynamic" if backend == "scaled_mm" else "")


def test_fuse_qkv_setting_is_on_by_default_and_reaches_the_policy():
    assert Settings().fp8_fuse_qkv is True
    assert load_settings(environ={}).fp8_fuse_qkv is True
    off = load_settings(environ={"SD35_FP8_FUSE_QKV": "0"})
    assert off.fp8_fuse_qkv is False
    assert PrecisionPolicy.from_settings(off).fuse_qkv is False
    assert PrecisionPolicy.from_settings(Settings()).fuse_qkv is True


def test_engine_images_are_the_same_with_fusion_on_and_off(tmp_path, models_dir):
    """The whole pipeline (demo model, precision fp8 on scaled_mm) with the setting on and off."""
    from test_fp8_integration import engine_with, pixels, settings_for, txt2img

    from engine.settings import DEMO_CHECKPOINT

    images = {}
    for fuse in (True, False):
        settings = settings_for(tmp_path / str(fuse), models_dir, precision="fp8", fp8_fuse_qkv=fuse)
        engine = engine_with(settings, choose=_grant_scaled_mm)
        result = engine.run(txt2img())
        assert result.record["precision"] == "fp8_e4m3fn/scaled_mm/dynamic"
        transformer = engine.models.checkpoint(DEMO_CHECKPOINT)[0].transformer
        assert bool(fused_qkv_layers(transformer)) is fuse
        images[fuse] = pixels(result)
    assert images[True].std() > 1.0
    assert abs(images[True] - images[False]).max() <= 1.0  # at most one level of 255 from float rounding
