"""Known-answer tests of layer / unit discovery and of unit masks."""
import pytest
import torch
from torch import nn

from memloc.core.errors import MemlocError as UserError
from memloc.core.models import build_model
from memloc.core.units import HookNotFiredError, trace, unit_masks


def _structure(spec, shape=(1, 28, 28), **kw):
    torch.manual_seed(0)
    m = build_model(spec, shape, 10, **kw)
    return m, trace(m, torch.randn(2, *shape))


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _check_partition(model, st):
    keys = [k for l in st.layers for k in l.params]
    assert sorted(keys) == sorted(k for k, _ in model.named_parameters())  # each param exactly once
    assert sum(l.numel for l in st.layers) == sum(p.numel() for p in model.parameters())


def test_mlp_layers_and_units():
    m, st = _structure("mlp")
    assert st.layer_names == ["fc1", "fc2", "head"]
    assert [(s.name, s.size, s.offset, s.dim) for s in st.spaces] == [("fc1", 512, 0, -1), ("fc2", 512, 512, -1)]
    assert st.n_units == 1024
    assert st.layer("fc1").params == ("fc1.weight", "fc1.bias")
    _check_partition(m, st)


def test_lenet_layers_and_units():
    m, st = _structure("lenet")
    assert st.layer_names == ["features.0", "features.3", "classifier.0", "classifier.2", "classifier.4"]
    assert [s.size for s in st.spaces] == [6, 16, 120, 84]
    assert [s.dim for s in st.spaces] == [1, 1, -1, -1]
    _check_partition(m, st)


def test_resnet9_layers_include_batchnorm():
    m, st = _structure("resnet9", width=4)
    convs = ["prep.0", "layer1.0.0", "layer1.1.res1.0", "layer1.1.res2.0", "layer2.0", "layer3.0.0",
             "layer3.1.res1.0", "layer3.1.res2.0"]
    assert st.layer_names == convs + ["linear"]
    for name in convs:
        layer = st.layer(name)
        norm = name[:-1] + "1"
        assert layer.modules == (name, norm)
        assert layer.buffers == (f"{norm}.running_mean", f"{norm}.running_var", f"{norm}.num_batches_tracked")
    assert [s.size for s in st.spaces] == [4, 8, 8, 8, 16, 32, 32, 32]
    assert st.space("prep.0").norm == "prep.1"
    _check_partition(m, st)


def test_timm_resnet18():
    m, st = _structure("timm:resnet18")
    assert len(st.layers) == 21 and st.layers[0].modules == ("conv1", "bn1")
    assert st.layers[-1].name == "fc" and "layer4.0.downsample.0" in st.layer_names
    assert st.layer("layer4.0.downsample.0").modules == ("layer4.0.downsample.0", "layer4.0.downsample.1")
    assert len(st.spaces) == 20 and st.n_units == 4800
    _check_partition(m, st)


def test_timm_vit():
    m, st = _structure("timm:vit_tiny_patch16_224", shape=(3, 32, 32))
    assert len(st.layers) == 76
    per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    assert st.layer_names[1:7] == [f"blocks.0.{n}" for n in per_block]
    assert st.layer("blocks.0.norm1").kind == "norm" and st.layer("<root>").kind == "param"
    assert set(st.layer("<root>").params) == {"cls_token", "pos_embed"}
    assert st.space("blocks.3.mlp.fc1").size == 768 and st.space("blocks.3.mlp.fc1").dim == -1
    assert len(st.spaces) == 49 and st.n_units == 192 + 12 * (576 + 192 + 768 + 192)
    _check_partition(m, st)


def test_model_errors():
    with pytest.raises(UserError, match="unknown model 'nope'"):
        build_model("nope", (1, 28, 28), 10)
    with pytest.raises(UserError, match="unknown timm model"):
        build_model("timm:not_a_model", (1, 28, 28), 10)
    with pytest.raises(UserError, match="model family"):
        build_model("keras:x", (1, 28, 28), 10)


def test_torchvision_model_adapted():
    m = build_model("torchvision:resnet18", (1, 28, 28), 7)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_mask_zeroes_exactly_the_unit():
    m, st = _structure("mlp")
    x = torch.randn(3, 1, 28, 28)
    mask = torch.ones(3, st.n_units)
    mask[1, 5] = 0.0           # example 1: fc1 unit 5
    mask[2, 512 + 7] = 0.0     # example 2: fc2 unit 7
    with unit_masks(m, st, mask):
        out = m(x)
    h1 = torch.relu(m.fc1(m.flatten(x)))
    h1_masked = h1.clone()
    h1_masked[1, 5] = 0.0
    h2 = m.fc2(h1_masked)
    h2[2, 7] = 0.0
    expected = m.head(torch.relu(h2))
    torch.testing.assert_close(out, expected)
    assert _no_hooks(m)


def test_mask_gradient_is_activation_times_gradient():
    m, st = _structure("lenet")
    x = torch.randn(2, 1, 28, 28)
    mask = torch.ones(2, st.n_units, requires_grad=True)
    with unit_masks(m, st, mask):
        m(x).sum().backward()
    acts = {}

    def keep(mod, inp, out):
        out.retain_grad()
        acts["a"] = out

    h = m.features[0].register_forward_hook(keep)
    try:
        m(x).sum().backward()
    finally:
        h.remove()
    a = acts["a"]
    expected = (a * a.grad).sum(dim=(2, 3))  # (B, 6): summed over spatial positions
    torch.testing.assert_close(mask.grad[:, :6], expected)


def test_post_norm_site_differs_from_pre_norm():
    m, st = _structure("resnet9", width=4)
    x = torch.randn(2, 1, 28, 28)
    mask = torch.ones(st.n_units)
    mask[:4] = 0.0  # all of prep.0's channels
    bn = m.prep[1]
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(0.5, 1)
    m.eval()
    with unit_masks(m, st, mask, site="pre_norm"):
        pre = m(x)
    with unit_masks(m, st, mask, site="post_norm"):
        post = m(x)
    # zeroing before BN leaves BN's shift (-mean/std*gamma + beta); zeroing after BN kills the channel
    assert not torch.allclose(pre, post)
    with unit_masks(m, st, {"prep.0": torch.zeros(4)}, site="pre_norm"):
        prep_out = m.prep(x)
    shift = (bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()).relu()
    torch.testing.assert_close(prep_out, shift[None, :, None, None].expand_as(prep_out))


def test_hooks_removed_after_failure_and_unfired_hook_is_error():
    m, st = _structure("lenet")
    with pytest.raises(RuntimeError, match="boom"):
        with unit_masks(m, st, torch.ones(st.n_units)):
            m(torch.randn(1, 1, 28, 28))
            raise RuntimeError("boom")
    assert _no_hooks(m)
    with pytest.raises(HookNotFiredError):
        with unit_masks(m, st, torch.ones(st.n_units)):
            pass
    assert _no_hooks(m)
    with pytest.raises(ValueError, match="batch"):
        with unit_masks(m, st, torch.ones(3, st.n_units)):
            m(torch.randn(2, 1, 28, 28))
    assert _no_hooks(m)
    assert trace(m, torch.randn(1, 1, 28, 28)) and _no_hooks(m)


def test_trace_does_not_touch_running_stats_or_mode():
    m, _ = _structure("resnet9", width=4)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trace(m, torch.randn(4, 1, 28, 28))
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_custom_module_with_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ln = nn.LayerNorm(8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.emb(x)
            h = self.ln(self.attn(h, h, h)[0] + h)
            return self.out(h.mean(1))

    m = Net()
    st = trace(m, torch.randn(2, 5, 4))
    assert st.layer_names == ["emb", "attn", "ln", "out"]
    assert st.layer("attn").kind == "attention" and "attn.out_proj.weight" in st.layer("attn").params
    assert [s.name for s in st.spaces] == ["emb"]
    _check_partition(m, st)
