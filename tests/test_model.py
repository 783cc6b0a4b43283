"""The network: shapes, parameter names, and loading a state dict saved by the seed's notebook.

The seed's state dict is written out by hand below (names and shapes from the seed's description
of its network, at its width 10), never by instantiating CIFAR100Model, so a renamed layer or a
changed shape in model/network.py fails here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model import (SHIPPED_WEIGHTS, CIFAR100Model, ResidualSEBlock, SEBlock, fold_batchnorm, infer_width_and_classes,
                   network_from_state_dict)



def _batchnorm(prefix: str, channels: int) -> dict[str, torch.Size]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,),
            f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
            f"{prefix}.num_batches_tracked": ()}


def _block(prefix: str, c_in: int, c_out: int, se_hidden: int, shortcut: bool) -> dict[str, tuple]:
    shapes = {f"{prefix}.conv1.weight": (c_out, c_in, 3, 3)}
    shapes |= _batchnorm(f"{prefix}.bn1", c_out)
    shapes[f"{prefix}.conv2.weight"] = (c_out, c_out, 3, 3)
    shapes |= _batchnorm(f"{prefix}.bn2", c_out)
    shapes |= {f"{prefix}.se.fc1.weight": (se_hidden, c_out), f"{prefix}.se.fc1.bias": (se_hidden,),
               f"{prefix}.se.fc2.weight": (c_out, se_hidden), f"{prefix}.se.fc2.bias": (c_out,)}
    if shortcut:  # a bare 1x1 conv (no BN) where the block changes channels or stride
        shapes[f"{prefix}.shortcut.weight"] = (c_out, c_in, 1, 1)
    return shapes


def seed_state_dict_shapes_width10() -> dict[str, tuple]:
    """The seed notebook's CIFAR100_model.pth at width 10: stem 16, stages 160/320/640, SE reduction 16."""
    shapes = {"stem.0.weight": (16, 3, 3, 3)}
    shapes |= _batchnorm("stem.1", 16)
    shapes |= _block("stage1.0", 16, 160, 10, shortcut=True)
    shapes |= _block("stage1.1", 160, 160, 10, shortcut=False)
    shapes |= _block("stage2.0", 160, 320, 20, shortcut=True)
    shapes |= _block("stage2.1", 320, 320, 20, shortcut=False)
    shapes |= _block("stage3.0", 320, 640, 40, shortcut=True)
    shapes |= _block("stage3.1", 640, 640, 40, shortcut=False)
    shapes |= {"fc.weight": (100, 640), "fc.bias": (100,)}
    return shapes


def seed_state_dict_width10() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: (torch.tensor(7, dtype=torch.int64) if name.endswith("num_batches_tracked")
                   else torch.randn(shape, generator=gen))
            for name, shape in seed_state_dict_shapes_width10().items()}


def test_seed_state_dict_loads_strictly_at_width_10():
    seed_state = seed_state_dict_width10()
    model = CIFAR100Model(width=10, num_classes=100)
    model.load_state_dict(seed_state, strict=True)
    loaded = model.state_dict()
    assert loaded.keys() == seed_state.keys()
    for name, tensor in seed_state.items():
        assert torch.equal(loaded[name], tensor), name
    assert infer_width_and_classes(seed_state) == (10, 100)


def test_strict_loading_rejects_a_state_dict_that_differs():
    """The loading test above could fail: one missing key or one wrong shape is refused."""
    missing = seed_state_dict_width10()
    del missing["stage2.0.shortcut.weight"]
    with pytest.raises(RuntimeError, match="stage2.0.shortcut.weight"):
        CIFAR100Model(width=10).load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CIFAR100Model(width=8).load_state_dict(seed_state_dict_width10(), strict=True)


@pytest.mark.parametrize("width, num_classes", [(1, 100), (2, 100), (2, 10)])
def test_output_and_stage_shapes(width, num_classes):
    model = CIFAR100Model(width=width, num_classes=num_classes).eval()
    seen = {}
    for name in ("stem", "stage1", "stage2", "stage3"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.shape))
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, num_classes)
    assert seen == {"stem": (3, 16, 32, 32), "stage1": (3, 16 * width, 32, 32),
                    "stage2": (3, 32 * width, 16, 16), "stage3": (3, 64 * width, 8, 8)}
    assert infer_width_and_classes(model.state_dict()) == (width, num_classes)


def test_structure_matches_the_seed_recipe():
    model = CIFAR100Model(width=4)
    for stage in (model.stage1, model.stage2, model.stage3):
        assert len(stage) == 2 and all(isinstance(block, ResidualSEBlock) for block in stage)
    assert isinstance(model.stage3[1].se, SEBlock)
    assert model.stage3[1].se.fc1.out_features == 64 * 4 // 16  # SE reduction 16
    assert model.stage2[0].conv1.stride == (2, 2) and model.stage1[0].conv1.stride == (1, 1)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == pytest.approx(0.3)
    assert CIFAR100Model(width=2, dropout=0.1).dropout.p == pytest.approx(0.1)
    with pytest.raises(ValueError, match="width"):
        CIFAR100Model(width=0)


def test_se_gate_rescales_channels_between_0_and_1():
    se = SEBlock(32)
    x = torch.rand(2, 32, 4, 4) + 0.5
    out = se(x)
    ratio = out / x  # one gate per (image, channel), the same at every pixel
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert bool(((ratio > 0) & (ratio < 1)).all())


def test_shipped_weights_load_at_their_own_width():
    state = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    width, num_classes = infer_width_and_classes(state)
    model = CIFAR100Model(width=width, num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, num_classes)


def test_folding_batchnorm_keeps_the_answers_and_the_stages_as_modules():
    """The one fold every served form is made from (engines, Grad-CAM's network, the int8 network)."""
    state = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        expected = network_from_state_dict(state).eval()(images)
        folded = fold_batchnorm(network_from_state_dict(state))
        assert not folded.training and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == 13 and all(c.bias is not None for c in convs)  # stem + 2 per block: BN's shift is the bias
        torch.testing.assert_close(folded(images), expected, atol=1e-4, rtol=1e-4)
        assert isinstance(folded.stage3, nn.Sequential) and isinstance(folded.stage3[-1], ResidualSEBlock)
        # Folding again changes nothing; channels_last (as served) gives the same logits.
        torch.testing.assert_close(fold_batchnorm(folded)(images), expected, atol=1e-4, rtol=1e-4)
        served = folded.to(memory_format=torch.channels_last)
        torch.testing.assert_close(served(images.contiguous(memory_format=torch.channels_last)), expected,
                                   atol=1e-4, rtol=1e-4)


def test_the_seeds_constructor_by_keyword_and_by_position_builds_the_seeds_network():
    """Code written against the seed calls CIFAR100Model(input_shape=3, width_multiplier=10, num_classes=100)."""
    seed_shapes = seed_state_dict_shapes_width10()
    for model in (CIFAR100Model(input_shape=3, width_multiplier=10, num_classes=100), CIFAR100Model(3, 10, 100),
                  CIFAR100Model()):
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == seed_shapes
        assert (model.width, model.num_classes, model.input_shape) == (10, 100, 3)
        assert model.dropout.p == pytest.approx(0.3)  # the seed's dropout, not the class count
        model.load_state_dict(seed_state_dict_width10(), strict=True)
    # This project's keyword names build the same network, and both names must agree.
    assert CIFAR100Model(width=2, num_classes=10).fc.weight.shape == CIFAR100Model(3, 2, 10).fc.weight.shape == (10, 128)
    assert CIFAR100Model(width_multiplier=2, width=2).width == 2
    with pytest.raises(TypeError, match="same setting"):
        CIFAR100Model(width_multiplier=2, width=3)
    with pytest.raises(ValueError, match="input_shape"):
        CIFAR100Model(input_shape=0)
    # input_shape is the number of input channels: a one-channel network takes grey images.
    with torch.no_grad():
        assert CIFAR100Model(1, 1, 5).eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_weights_file_becomes_the_network_of_its_own_width(tmp_path):
    """model.load_network / network_from_state_dict: the one way a state dict becomes the network."""
    from model import WeightsError, load_network, network_from_state_dict

    torch.manual_seed(0)
    trained = CIFAR100Model(width=2, num_classes=10).eval()
    torch.save(trained.state_dict(), tmp_path / "w2.pth")
    loaded = load_network(tmp_path / "w2.pth").eval()
    assert (loaded.width, loaded.num_classes) == (2, 10)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    # A training checkpoint gives its EMA weights (AveragedModel's "module." names, without the counter).
    ema = {f"module.{k}": v for k, v in trained.state_dict().items()} | {"n_averaged": torch.tensor(3)}
    torch.save({"epoch": 1, "model": CIFAR100Model(width=2, num_classes=10).state_dict(), "ema": ema},
               tmp_path / "checkpoint.pt")
    with torch.no_grad():
        assert torch.equal(load_network(tmp_path / "checkpoint.pt").eval()(x), trained(x))
    broken = trained.state_dict()
    del broken["stage1.0.se.fc1.bias"]
    with pytest.raises(WeightsError, match=r"do not fit CIFAR100Model\(width=2, num_classes=10\)"):
        network_from_state_dict(broken)
    with pytest.raises(WeightsError, match="not CIFAR100Model weights"):
        network_from_state_dict(nn.Linear(4, 2).state_dict())


def test_weights_of_integer_or_bool_values_are_refused_and_other_float_types_load():
    """load_state_dict casts what it is given: int64/int8/bool weights would make a float32 network that answers
    noise. Float types of another width load (float16 exports, bf16, float64); BatchNorm's counter stays integer."""
    from model import WeightsError, check_class_count

    torch.manual_seed(0)
    trained = CIFAR100Model(width=1, num_classes=100).eval()
    state = trained.state_dict()
    assert state["stem.1.num_batches_tracked"].dtype == torch.int64
    x = torch.randn(2, 3, 32, 32)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        loaded = network_from_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
        assert next(loaded.parameters()).dtype == torch.float32
        with torch.no_grad():
            assert loaded.eval()(x).argmax(1).tolist() == trained(x).argmax(1).tolist(), dtype
    for dtype in (torch.int64, torch.int8, torch.bool):
        with pytest.raises(WeightsError, match=rf"hold 'stem.0.weight' as {str(dtype)[6:]}, not floating point"):
            network_from_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    # A server names each class the network answers: another class count than the names is refused.
    check_class_count(100, [str(i) for i in range(100)])
    with pytest.raises(WeightsError, match="a network of 101 classes, but index_to_name.json names 100"):
        check_class_count(101, [str(i) for i in range(100)])


def test_finite_weights_that_overflow_are_refused_by_a_probe_forward_pass():
    """Every value finite, but fc.weight scaled to 1e38: every logit is infinite, so the servers started and then
    answered each request 500 while /health said ok. The one home of the weights checks now runs a blank image
    through the network (eval mode, the caller's mode kept) and refuses non-finite logits; weights large but in
    range still load."""
    from model import WeightsError, network_from_state_dict

    shipped = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    untrained = CIFAR100Model(width=1, num_classes=100).state_dict()  # BatchNorm biases 0
    assert network_from_state_dict(shipped).training  # returned in train mode, as built
    for state, name, value in ((shipped, "fc.weight", shipped["fc.weight"] * 1e38),
                               (shipped, "stage3.1.conv2.weight", shipped["stage3.1.conv2.weight"] * 1e38),
                               (untrained, "fc.weight", torch.full_like(untrained["fc.weight"], 3e38))):
        overflowing = dict(state, **{name: value})
        assert all(torch.isfinite(v).all() for v in overflowing.values() if v.is_floating_point())
        with pytest.raises(WeightsError, match="'w.pth' give NaN or infinite logits for a blank image although "
                                               "every value is finite"):
            network_from_state_dict(overflowing, "'w.pth'")
    network_from_state_dict(dict(shipped, **{"fc.weight": shipped["fc.weight"] * 1e3}))
    network_from_state_dict(untrained)


class _RunsCodeWhenUnpickled:
    """A .pth from elsewhere that would create a file when unpickled by plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_weights_file_that_would_run_code_is_refused_unrun(tmp_path):
    """load_network reads with weights_only: a pickle that calls a function is refused with one clear
    line, and the function never runs."""
    from model import WeightsError, load_network

    marker = tmp_path / "code-ran"
    torch.save(_RunsCodeWhenUnpickled(marker), tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="is not a readable PyTorch weights file"):
        load_network(tmp_path / "evil.pth")
    assert not marker.exists()


def test_normalization_is_the_cifar_statistics_once_for_training_and_serving():
    from handler.preprocessing import normalize as serving_normalize
    from model import CIFAR100_MEAN, CIFAR100_STD
    from training.data import normalize as training_normalize

    assert serving_normalize is training_normalize  # one function
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    x = training_normalize(images)
    expected = (images.float() / 255 - torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, expected, atol=1e-6)
    assert training_normalize(images, channels_last=False).is_contiguous()


@pytest.mark.integration  # the training split
def test_the_normalization_statistics_are_the_training_splits(cifar100_data_dir):
    from model import CIFAR100_MEAN, CIFAR100_STD
    from training.data import load_split

    images, _ = load_split(cifar100_data_dir, train=True)
    pixels = images.float().div_(255)
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
    # The seed's values, four decimals (0.4865 where the split gives 0.48655).
    assert torch.allclose(mean, torch.tensor(CIFAR100_MEAN), atol=1.5e-4), mean
    assert torch.allclose(std, torch.tensor(CIFAR100_STD), atol=1.5e-4), std


@pytest.mark.integration  # the data set's own meta file
def test_the_class_names_are_cifar100s_in_its_label_order(cifar100_data_dir):
    # Every other test that names classes reads index_to_name.json on both sides: two names swapped passed them all.
    import pickle

    from model.classes import load_class_names

    with open(cifar100_data_dir / "cifar-100-python" / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert load_class_names() == meta["fine_label_names"]

def test_flip_tta_is_the_mean_over_the_mirror_and_the_same_for_a_mirrored_image():
    from model.tta import flip_tta_logits

    torch.manual_seed(0)
    net = CIFAR100Model(width=1, num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tta = flip_tta_logits(net, images)
        assert torch.allclose(tta, (net(images) + net(images.flip(3))) / 2, atol=1e-5)
        assert torch.allclose(flip_tta_logits(net, images.flip(3)), tta, atol=1e-5)
        assert not torch.allclose(net(images), tta, atol=1e-3)  # it does change the answer
