"""The CoAtNet model against the paper (Table 3, appendix A.1) and the seed's public API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coatnet import (CoAtNet, CoAtNetBackbone, CoAtNetConfig, CoAtNetConvBlock,
                     CoAtNetRelativeAttention, CoAtNetTransformerBlock,
                     CoAtNetWithLinearClassifier, count_params_and_macs)
from coatnet.attention import relative_position_index
from coatnet.blocks import SqueezeExcitation

PAPER_PARAMS_M = {0: 25, 1: 42, 2: 75, 3: 168, 4: 275}
PAPER_MACS_224_G = {0: 4.2, 1: 8.4, 2: 15.7, 3: 34.7}
PAPER_MACS_384_G = {0: 13.4, 1: 27.4, 2: 49.8, 3: 107.4, 4: 189.5}


def tiny_config(**overrides) -> CoAtNetConfig:
    base = dict(image_height=32, image_width=32, image_channel=3,
                num_blocks_in_layers=[1, 2, 1, 2, 1], block_type_in_layers=["C", "C", "T", "T"],
                num_channels_in_layers=[8, 16, 16, 32, 32], expand_scale_in_layers=2,
                head_dim=8, num_classes=10)
    base.update(overrides)
    return CoAtNetConfig(**base)


# ---------------------------------------------------------------- paper figures
@pytest.mark.parametrize("index", range(5))
def test_params_match_paper(index: int) -> None:
    config = getattr(CoAtNet, f"CoAtNet_{index}")()
    params = count_params_and_macs(config).params
    assert abs(params / 1e6 - PAPER_PARAMS_M[index]) / PAPER_PARAMS_M[index] <= 0.03


@pytest.mark.parametrize("index", range(4))
def test_macs_at_224_match_paper(index: int) -> None:
    macs = count_params_and_macs(getattr(CoAtNet, f"CoAtNet_{index}")()).macs
    assert abs(macs / 1e9 - PAPER_MACS_224_G[index]) / PAPER_MACS_224_G[index] <= 0.03


@pytest.mark.parametrize("index", range(5))
def test_macs_at_384_match_paper(index: int) -> None:
    config = getattr(CoAtNet, f"CoAtNet_{index}")(image_height=384, image_width=384)
    macs = count_params_and_macs(config).macs
    assert abs(macs / 1e9 - PAPER_MACS_384_G[index]) / PAPER_MACS_384_G[index] <= 0.03


def test_counter_allocates_no_weights() -> None:
    # CoAtNet-4 would need >1 GB; counted on the meta device it allocates nothing real.
    before = torch.empty(0).new_empty(0)  # noqa: F841 - touch the allocator
    complexity = count_params_and_macs(CoAtNet.CoAtNet_4())
    assert complexity.params > 250e6


def test_depthwise_stride_would_cost_more() -> None:
    # Table 9: putting the stride in the 1x1 conv is what keeps CoAtNet-0 at ~4.2 G MACs.
    block = CoAtNetConvBlock(64, 96, downsample=True)
    assert block.conv[0].stride == (2, 2)
    assert block.conv[3].stride == (1, 1)


# ---------------------------------------------------------------- seed API
def test_seed_example_config_and_backbone() -> None:
    kwargs = dict(image_height=224, image_width=224, image_channel=3,
                  num_blocks_in_layers=[2, 2, 3, 5, 2], block_type_in_layers=["C", "C", "T", "T"],
                  num_channels_in_layers=[64, 96, 192, 384, 768], expand_scale_in_layers=4,
                  heads=32, num_classes=1000, pred_act_func_name="ReLU", ff_dropout=0.1,
                  attention_dropout=0.1, path_dropout=0.1)
    config = CoAtNetConfig(**kwargs)
    with torch.device("meta"):
        backbone = CoAtNetBackbone(**kwargs)
        model = CoAtNetWithLinearClassifier(config)
    assert backbone.config == config
    assert model.backbone.stages[3][0].attn.heads == 32
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 1000


def test_presets_need_no_arguments_and_take_num_classes() -> None:
    for name in CoAtNet.PRESETS:
        assert getattr(CoAtNet, name)().num_classes == 1000
    assert CoAtNet.CoAtNet_2(num_classes=10).num_classes == 10
    assert CoAtNet.CoAtNet_0().block_type_in_layers == ("C", "C", "T", "T")


def test_config_is_immutable_and_not_mutated_by_model() -> None:
    config = tiny_config()
    snapshot = config.to_dict()
    model = CoAtNetWithLinearClassifier(config)
    model.update_relative_bias_and_indices(64, 64)
    assert config.to_dict() == snapshot
    with pytest.raises(Exception):
        config.num_classes = 3  # type: ignore[misc]


def test_config_round_trips_through_dict_and_yaml(tmp_path) -> None:
    config = tiny_config(expand_scale_in_layers=[2, 2, 4, 4], path_dropout=0.1)
    assert CoAtNetConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "best_config.yaml"
    config.to_yaml(path)
    assert CoAtNetConfig.from_yaml(path) == config
    CoAtNetWithLinearClassifier(CoAtNetConfig.from_yaml(path))


def test_default_head_dim_is_the_papers_32() -> None:
    assert CoAtNetConfig().head_dim == 32
    assert CoAtNetConfig().heads_for(384) == 12


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, expected", [
    (dict(num_blocks_in_layers=[2, 2, 3, 5]), "num_blocks_in_layers=[2, 2, 3, 5]: must be a list of 5"),
    (dict(block_type_in_layers=["C", "C", "T"]), "block_type_in_layers=['C', 'C', 'T']: must be a list of 4"),
    (dict(num_channels_in_layers=[8, 16, 16, 32]), "num_channels_in_layers=[8, 16, 16, 32]: must be a list of 5"),
    (dict(expand_scale_in_layers=[2, 2]), "expand_scale_in_layers=[2, 2]: must be a positive int or a list of 4"),
    (dict(block_type_in_layers=["C", "X", "T", "T"]), "every entry must be one of ['C', 'T']"),
    (dict(num_blocks_in_layers=[1, 0, 1, 1, 1]), "num_blocks_in_layers=[1, 0, 1, 1, 1]: every entry must be a positive int"),
    (dict(num_channels_in_layers=[8, 16, 16, -32, 32]), "num_channels_in_layers=[8, 16, 16, -32, 32]: every entry must be a positive int"),
    (dict(num_classes=0), "num_classes=0: must be a positive int"),
    (dict(image_channel=1.5), "image_channel=1.5: must be a positive int"),
    (dict(expand_scale_in_layers=0), "expand_scale_in_layers=0: must be a positive int"),
    (dict(num_channels_in_layers=[8, 16, 16, 36, 36]), "num_channels_in_layers[3]=36: a T stage's channels must be divisible by head_dim=8"),
    (dict(head_dim=None, heads=5), "must be divisible by heads=5"),
    (dict(heads=4), "heads=4 and head_dim=8: give only one"),
    (dict(head_dim=0), "head_dim=0: must be a positive int"),
    (dict(image_height=16), "image_height=16: must be at least 32"),
    (dict(image_width=31), "image_width=31: must be at least 32"),
    (dict(ff_dropout=1.0), "ff_dropout=1.0: must be a number in [0, 1)"),
    (dict(attention_dropout=-0.1), "attention_dropout=-0.1: must be a number in [0, 1)"),
    (dict(path_dropout="0.1"), "path_dropout='0.1': must be a number in [0, 1)"),
    (dict(pred_act_func_name="Relu"), "pred_act_func_name='Relu': must name an activation class in torch.nn"),
    (dict(pred_hidden_dim=0), "pred_hidden_dim=0: must be a positive int"),
    (dict(se_ratio=2.0), "se_ratio=2.0: must be a number in [0, 1]"),
])
def test_each_rule_names_field_value_and_allowed(overrides, expected) -> None:
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert expected in str(error.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ValueError) as error:
        tiny_config(image_height=8, ff_dropout=2.0, num_classes=-1)
    message = str(error.value)
    assert "image_height=8" in message and "ff_dropout=2.0" in message \
        and "num_classes=-1" in message


def test_unknown_field_in_dict_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['depth'\]"):
        CoAtNetConfig.from_dict({"depth": 3})


# ---------------------------------------------------------------- shapes and gradients
@pytest.mark.parametrize("size", [(224, 224), (384, 384), (256, 320), (32, 32), (100, 75),
                                  (33, 47)])
def test_output_shapes_at_many_sizes(size) -> None:
    model = CoAtNetWithLinearClassifier(tiny_config(image_height=224, image_width=224)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
        features = model.forward_features(torch.randn(1, 3, *size))
    assert logits.shape == (2, 10)
    assert features.shape[-2:] == tuple(math.ceil(s / 32) for s in size)


def test_coatnet0_runs_at_224_and_384() -> None:
    model = CoAtNetWithLinearClassifier(CoAtNet.CoAtNet_0(num_classes=5)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 5)


def test_every_parameter_gets_a_gradient() -> None:
    # At 64 px the S4 map is 2x2: a 1x1 map has one token, whose softmax ignores its bias.
    model = CoAtNetWithLinearClassifier(tiny_config(image_height=64, image_width=64,
                                                    pred_hidden_dim=16, pred_act_func_name="ReLU"))
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


def test_gradient_flows_through_interpolated_table() -> None:
    model = CoAtNetWithLinearClassifier(tiny_config())
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    table = model.backbone.stages[3][0].attn.relative_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_eval_mode_is_deterministic() -> None:
    model = CoAtNetWithLinearClassifier(tiny_config(ff_dropout=0.3, attention_dropout=0.3,
                                                    path_dropout=0.3)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_stochastic_depth_rises_linearly() -> None:
    model = CoAtNetWithLinearClassifier(tiny_config(path_dropout=0.3))
    rates = [block.drop_path.p for stage in model.backbone.stages for block in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(s == pytest.approx(steps[0]) for s in steps)


# ---------------------------------------------------------------- blocks
def test_mbconv_has_a_single_residual() -> None:
    block = CoAtNetConvBlock(16, 16, downsample=False).eval()
    nn.init.zeros_(block.conv[-1].weight)
    nn.init.zeros_(block.conv[-1].bias)
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(block(x), x)  # branch silenced: exactly x, not 2x


@pytest.mark.parametrize("height, width", [(7, 5), (1, 1)])
def test_squeeze_excitation_gates_by_the_mean_with_gradients(height: int, width: int) -> None:
    se = SqueezeExcitation(12, 3).double()
    x = torch.randn(2, 12, height, width, dtype=torch.float64,
                    requires_grad=True).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 12, height, width, dtype=torch.float64)

    def reference(x: torch.Tensor) -> torch.Tensor:  # Hu et al.: global *average* pool
        gate = se.fc2(F.gelu(se.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()
        return x * gate

    out, expected = se(x), reference(x)
    params = [x, *se.parameters()]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    assert torch.allclose(out, expected, atol=1e-12)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)


@pytest.mark.parametrize("side", [1, 2, 3, 7, 8])
def test_downsampling_blocks_agree_on_ceil_size(side: int) -> None:
    x = torch.randn(1, 8, side, side)
    conv = CoAtNetConvBlock(8, 16, downsample=True).eval()
    out_side = math.ceil(side / 2)
    attn = CoAtNetTransformerBlock(8, 16, downsample=True, heads=2, height=out_side,
                                   width=out_side).eval()
    assert conv(x).shape == (1, 16, out_side, out_side)
    assert attn(x).shape == (1, 16, out_side, out_side)


# ---------------------------------------------------------------- relative attention
@pytest.mark.parametrize("height, width", [(7, 7), (4, 6), (1, 1), (2, 2)])
def test_index_has_no_aliasing_and_uses_every_entry(height: int, width: int) -> None:
    index = relative_position_index(height, width)
    assert index.unique().numel() == (2 * height - 1) * (2 * width - 1)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None, :]
    dx = xs.flatten()[:, None] - xs.flatten()[None, :]
    assert torch.equal(index, (dy + height - 1) * (2 * width - 1) + dx + width - 1)


def test_bias_is_a_function_of_offset_only() -> None:
    attn = CoAtNetRelativeAttention(16, heads=2, height=5, width=4)
    bias = attn.relative_bias()
    assert bias.shape == (2, 20, 20)
    positions = [(i // 4, i % 4) for i in range(20)]
    by_offset: dict[tuple[int, int], torch.Tensor] = {}
    for i, (yi, xi) in enumerate(positions):
        for j, (yj, xj) in enumerate(positions):
            offset = (yi - yj, xi - xj)
            if offset in by_offset:
                assert torch.equal(bias[:, i, j], by_offset[offset])
            by_offset[offset] = bias[:, i, j]
    table = attn.relative_bias_table
    assert torch.equal(bias[:, 0, 0], table[:, 4, 3])  # offset (0, 0) is the table's centre


def test_attention_matches_the_papers_formula() -> None:
    torch.manual_seed(0)
    attn = CoAtNetRelativeAttention(16, heads=2, height=3, width=3).eval()
    x = torch.randn(2, 9, 16)
    q, k, v = attn.qkv(x).view(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) + attn.relative_bias()
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 16))
    assert torch.allclose(attn(x, 3, 3), expected, atol=1e-5)


def test_interpolated_bias_keeps_centre_and_corners() -> None:
    attn = CoAtNetRelativeAttention(16, heads=2, height=7, width=7)
    table = attn.relative_bias_table
    resized = attn.relative_bias(12, 12).detach()
    assert torch.allclose(resized[:, 0, 0], table[:, 6, 6])  # zero offset
    assert torch.allclose(resized[:, -1, 0], table[:, -1, -1])  # largest offset


def test_update_matches_dynamic_interpolation_and_stores_a_parameter() -> None:
    torch.manual_seed(0)
    model = CoAtNetWithLinearClassifier(tiny_config()).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        dynamic = model(x)
    model.update_relative_bias_and_indices(96, 64)
    attn = model.backbone.stages[3][0].attn
    assert isinstance(attn.relative_bias_table, nn.Parameter)
    assert attn.relative_bias_table.shape == (4, 2 * 3 - 1, 2 * 2 - 1)
    assert (attn.height, attn.width) == (3, 2)
    assert any(p is attn.relative_bias_table for p in model.parameters())
    with torch.no_grad():
        stored = model(x)
    assert torch.allclose(dynamic, stored, atol=1e-6)


# ---------------------------------------------------------------- state dicts and compile
def test_state_dict_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = CoAtNetWithLinearClassifier(tiny_config()).eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other = CoAtNetWithLinearClassifier(tiny_config()).eval()
    other.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), other(x))


def test_loading_224_weights_into_a_384_model_resizes_tables() -> None:
    torch.manual_seed(0)
    small = CoAtNetWithLinearClassifier(tiny_config(image_height=224, image_width=224)).eval()
    big = CoAtNetWithLinearClassifier(tiny_config(image_height=384, image_width=384)).eval()
    big.load_state_dict(small.state_dict())
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.allclose(big(x), small(x), atol=1e-5)


def test_torch_compile_matches_eager() -> None:
    torch.manual_seed(0)
    model = CoAtNetWithLinearClassifier(tiny_config()).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_model_runs_channels_last_and_accepts_nchw_batches() -> None:
    torch.manual_seed(0)
    model = CoAtNetWithLinearClassifier(tiny_config()).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.randn(2, 3, 32, 32)  # NCHW, as a DataLoader yields
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)),
                              reference, atol=1e-5)
        # A model moved back to NCHW computes the same function.
        nchw = model.to(memory_format=torch.contiguous_format)
        assert torch.allclose(nchw(x), reference, atol=1e-5)
    x.requires_grad_()
    model.train()(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_sdpa_bias_is_additive_mask_not_boolean() -> None:
    attn = CoAtNetRelativeAttention(8, heads=1, height=2, width=2)
    assert attn.relative_bias().dtype.is_floating_point
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        attn.relative_bias_table.zero_()
        q, k, v = attn.qkv(x).view(1, 4, 3, 1, 8).permute(2, 0, 3, 1, 4)
        plain = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 4, 8))
        assert torch.allclose(attn(x, 2, 2), plain, atol=1e-6)


def test_stochastic_depth_drops_whole_samples_and_keeps_the_mean() -> None:
    from coatnet.blocks import StochasticDepth

    torch.manual_seed(0)
    drop = StochasticDepth(0.25).train()
    out = drop(torch.ones(4000, 3, 2, 2))
    per_sample = out.flatten(1)
    assert torch.allclose(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # whole rows
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(drop.eval()(torch.ones(2, 3)), torch.ones(2, 3))


def test_model_and_train_loop_do_not_import_torchvision() -> None:
    # Every Ray Train worker imports these; torchvision alone costs it 1.5-3 s.
    import subprocess
    import sys

    code = ("import sys, coatnet, coatnet.search.train_loop; "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _autograd_node_names(out: torch.Tensor) -> set[str]:
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("rows", [(3, 17), (4, 50)], ids=["51-rows", "200-rows"])
@pytest.mark.parametrize("bias", [True, False])
def test_token_linear_matches_linear_with_gradients(rows: tuple[int, int], bias: bool) -> None:
    from coatnet.linear import TokenLinear, onednn_linear_available

    assert onednn_linear_available()  # else this would compare F.linear with itself
    torch.manual_seed(0)
    fast = TokenLinear(24, 40, bias=bias)
    plain = nn.Linear(24, 40, bias=bias)
    plain.load_state_dict(fast.state_dict())  # same parameters, same state-dict keys
    x = torch.randn(*rows, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out = fast(x)
    assert "_OneDNNLinearBackward" in _autograd_node_names(out)
    assert torch.allclose(out, plain(x2), atol=1e-5)
    out.square().sum().backward()
    plain(x2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)
    assert torch.allclose(fast.weight.grad, plain.weight.grad, atol=1e-4)
    if bias:
        assert torch.allclose(fast.bias.grad, plain.bias.grad, atol=1e-4)
    # An input that needs no gradient (the first layer) still trains the weight.
    fast.weight.grad = None
    fast(x.detach()[:, :5]).sum().backward()
    assert fast.weight.grad is not None and fast.weight.grad.abs().sum() > 0
    assert fast(torch.randn(5, 24)).shape == (5, 40)  # other shapes take F.linear
    assert fast.double()(torch.randn(2, 5, 24, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags()
def test_token_linear_respects_onednn_switched_off() -> None:
    from coatnet.linear import TokenLinear

    torch.manual_seed(0)
    fast = TokenLinear(24, 40)
    x = torch.randn(2, 7, 24, requires_grad=True)
    with torch.backends.mkldnn.flags(enabled=False):
        out = fast(x)
    assert "_OneDNNLinearBackward" not in _autograd_node_names(out)
    assert torch.allclose(out, F.linear(x, fast.weight, fast.bias), atol=1e-6)


def test_token_linear_falls_back_with_a_warning_when_the_op_is_unusable(monkeypatch) -> None:
    import coatnet.linear as linear

    monkeypatch.setattr(linear, "_SCHEMA", "mkldnn::_linear_pointwise(Tensor X) -> Tensor Y")
    linear.onednn_linear_available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="falls back to F.linear.*expected 'mkldnn::"):
            assert not linear.onednn_linear_available()
        layer = linear.TokenLinear(8, 4)
        x = torch.randn(2, 3, 8, requires_grad=True)
        out = layer(x)
        assert "_OneDNNLinearBackward" not in _autograd_node_names(out)
        assert torch.allclose(out, F.linear(x, layer.weight, layer.bias))
    finally:
        linear.onednn_linear_available.cache_clear()  # the real op is checked again after


def test_flop_counter_counts_the_onednn_products_on_cpu() -> None:
    # The MFU figures and anyone's FlopCounterMode on a CPU model must still see the projections.
    from torch.utils.flop_counter import FlopCounterMode

    config = tiny_config()
    model = CoAtNetWithLinearClassifier(config).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, config.image_height, config.image_width))
    assert "mkldnn._linear_pointwise" in {str(op) for op in counter.get_flop_counts()["Global"]}
    assert counter.get_total_flops() == 2 * count_params_and_macs(config).macs
