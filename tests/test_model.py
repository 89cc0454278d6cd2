import pytest
import torch

from celeba_app.config import ConfigError
from celeba_app.model import Backbone, BackboneWithHead, head_state, load_mobilenet, make_head
from celeba_app.task import train_head


def test_backbone_weights_and_bn_statistics_are_bit_identical_after_training(weights_file):
    backbone = Backbone(load_mobilenet(str(weights_file)))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert any("running_mean" in k for k in before)  # BN buffers are part of what is checked
    model = BackboneWithHead(backbone, make_head(1280, seed=0))
    model.train()  # what a careless training loop does; the backbone must refuse it
    assert not backbone.training and all(not m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.randn(12, 3, 32, 32)
    y = torch.randint(0, 2, (12,))
    train_head(model.head, x, y, epochs=2, lr=0.05, batch_size=4, seed=0, encoder=backbone)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # and a loop that optimises the whole model
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y.float()).backward()
        opt.step()
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"backbone tensor {k} changed"


def test_head_is_fresh_binary_and_is_all_that_travels():
    head = make_head(1280, dropout=0.1, seed=3)
    state = head_state(head)
    assert set(state) == {"1.weight", "1.bias"}
    assert tuple(state["1.weight"].shape) == (1, 1280)
    assert torch.equal(state["1.weight"], head_state(make_head(1280, seed=3))["1.weight"])
    assert not torch.equal(state["1.weight"], head_state(make_head(1280, seed=4))["1.weight"])


def test_bad_weights_file_is_named(tmp_path):
    bad = tmp_path / "not_weights.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="is not a mobilenet_v2 state_dict"):
        load_mobilenet(str(bad))


def test_unreachable_imagenet_weights_are_one_clear_line(monkeypatch):
    from urllib.error import URLError

    import torchvision.models

    def offline(weights=None):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "mobilenet_v2", offline)
    with pytest.raises(ConfigError, match="weights='imagenet' could not be downloaded by torchvision"):
        load_mobilenet("imagenet")


# --- weights files: what clearly is a MobileNetV2 loads; anything else names its first mismatch


@pytest.fixture(scope="module")
def plain_state(weights_file):
    return torch.load(weights_file, weights_only=True)


def _module(sd):
    return {f"module.{k}": v for k, v in sd.items()}


def _no_classifier(sd):
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def _two_classes(sd):
    return {**_no_classifier(sd), "classifier.1.weight": torch.zeros(2, 1280),
            "classifier.1.bias": torch.zeros(2)}


ACCEPTED_FORMS = {
    "plain": (lambda sd: sd, None),
    "dataparallel": (_module, "stripped the 'module.' prefix (a DataParallel/DDP checkpoint)"),
    "state_dict-wrapper": (lambda sd: {"state_dict": sd, "epoch": 3},
                           "took the state_dict under 'state_dict' (ignored 'epoch')"),
    "model-wrapper": (lambda sd: {"model": sd}, "took the state_dict under 'model'"),
    "model_state_dict-ddp": (lambda sd: {"model_state_dict": _module(sd), "optimizer": {"lr": 0.1}},
                             "took the state_dict under 'model_state_dict' (ignored 'optimizer'); "
                             "stripped the 'module.' prefix"),
    "no-classifier": (_no_classifier, None),
    "two-class-classifier": (_two_classes, "ignored 2 keys outside features.* (classifier.1.weight, "
                                           "classifier.1.bias); the app replaces the classifier"),
}


@pytest.mark.parametrize("form", ACCEPTED_FORMS)
def test_accepted_weights_forms_load_the_same_features(form, plain_state, weights_file, tmp_path, caplog):
    make, note = ACCEPTED_FORMS[form]
    path = tmp_path / f"{form}.pth"
    torch.save(make(dict(plain_state)), path)
    with caplog.at_level("INFO", logger="flwr"):
        loaded = load_mobilenet(str(path)).features.state_dict()
    reference = load_mobilenet(str(weights_file)).features.state_dict()
    assert loaded.keys() == reference.keys()
    for k in reference:
        assert torch.equal(loaded[k], reference[k]), k
        assert torch.equal(loaded[k], plain_state[f"features.{k}"]), k
    lines = [r.getMessage() for r in caplog.records if "celeba-fl: weights=" in r.getMessage()]
    if note is None:
        assert lines == []  # a plain file loads silently
    else:
        assert len(lines) == 1 and note in lines[0], lines


def _refusal(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_mobilenet(str(path))
    message = str(info.value)
    assert message.startswith(f"weights={str(path)!r} ") and "\n" not in message, message
    assert "; accepted: 'imagenet' or a torchvision mobilenet_v2 state_dict file" in message
    return message


def test_resnet_weights_are_refused_naming_the_missing_keys_and_what_it_has(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert ("is not a mobilenet_v2 state_dict: it has none of mobilenet_v2's 312 features.* keys "
            "(features.0.0.weight, features.0.1.weight, features.0.1.bias, ...); its keys are "
            "conv1.weight, bn1.weight, bn1.bias, ...") in _refusal(path)


def test_missing_features_key_is_named_with_the_count(plain_state, tmp_path):
    path = tmp_path / "missing.pth"
    gone = ["features.3.conv.1.0.weight", "features.17.conv.3.bias"]
    torch.save({k: v for k, v in plain_state.items() if k not in gone}, path)
    assert ("is not a mobilenet_v2 state_dict: 2 of mobilenet_v2's 312 features.* keys are missing "
            "(features.3.conv.1.0.weight, features.17.conv.3.bias)") in _refusal(path)


def test_unexpected_features_key_is_named(plain_state, tmp_path):
    path = tmp_path / "unexpected.pth"
    torch.save({**plain_state, "features.19.0.weight": torch.zeros(3)}, path)
    assert ("is not a mobilenet_v2 state_dict: 1 of its features.* keys is not in mobilenet_v2 "
            "(features.19.0.weight)") in _refusal(path)


def test_shape_mismatch_names_the_key_and_both_shapes(plain_state, tmp_path):
    path = tmp_path / "shape.pth"
    torch.save({**plain_state, "features.18.0.weight": torch.zeros(640, 320, 1, 1)}, path)
    assert ("is not a mobilenet_v2 state_dict: features.18.0.weight has shape (640, 320, 1, 1), "
            "mobilenet_v2's is (1280, 320, 1, 1)") in _refusal(path)


def test_a_half_width_mobilenet_names_its_first_shape(tmp_path):
    import torchvision

    path = tmp_path / "half.pth"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.5).state_dict(), path)
    assert "features.0.0.weight has shape (16, 3, 3, 3), mobilenet_v2's is (32, 3, 3, 3)" in _refusal(path)


def test_a_dict_that_is_no_state_dict_names_its_keys(plain_state, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "weights": plain_state}, path)
    assert ("is not a state_dict (a dict of tensors): it holds a dict with keys 'epoch', 'weights'"
            in _refusal(path))


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "pickled-module"])
def test_unreadable_file_names_the_file_and_the_error(kind, weights_file, tmp_path):
    import torchvision

    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"not a torch file\n" * 8)
        expected = "cannot be read by torch.load ("
    elif kind == "empty":
        path.write_bytes(b"")
        expected = "is an empty file"
    elif kind == "truncated":
        data = weights_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = ("cannot be read by torch.load (RuntimeError: PytorchStreamReader failed reading "
                    "zip archive")
    else:
        torch.save(torchvision.models.mobilenet_v2(), path)
        expected = ("holds a pickled torchvision.models.mobilenetv2.MobileNetV2, which "
                    "torch.load(weights_only=True) does not run (save model.state_dict() instead)")
    message = _refusal(path)
    assert expected in message
    assert "is not a mobilenet_v2 state_dict" not in message


def test_imagenet_identity_is_torchvisions_url():
    """weights='imagenet' is known by a constant (no torchvision import per message)."""
    from torchvision.models import MobileNet_V2_Weights

    from celeba_app.model import IMAGENET1K_V1_URL, weights_digest

    assert weights_digest("imagenet") == IMAGENET1K_V1_URL == MobileNet_V2_Weights.IMAGENET1K_V1.url


@pytest.mark.parametrize("h, w, pool", [(14, 14, 3), (14, 14, 7), (7, 7, 7), (28, 28, 4), (5, 7, 2), (3, 3, 1), (6, 6, 4)])
def test_explicit_pooling_equals_torchs_adaptive_average_pool(h, w, pool):
    from celeba_app.model import AdaptiveAvgPool2d

    x = torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(h * w + pool))
    ref = torch.nn.functional.adaptive_avg_pool2d(x, pool)
    assert torch.allclose(AdaptiveAvgPool2d(pool)(x), ref, atol=1e-6)


@pytest.mark.parametrize("layer, pool", [(18, 1), (13, 3), (6, 2), (0, 4)])
def test_backbone_reads_the_block_and_pools_it_channel_major(weights_file, layer, pool):
    """feature-layer=i, feature-pool=p: flatten(adaptive_avg_pool2d(features[i] output, p), 1),
    with only the blocks up to i kept (the rest is never run)."""
    mobilenet = load_mobilenet(str(weights_file))
    backbone = Backbone(mobilenet, layer, pool)
    assert len(backbone.features) == layer + 1 and backbone.dim == backbone(torch.zeros(1, 3, 64, 64)).shape[1]
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(layer))
    with torch.no_grad():
        ref = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(mobilenet.features[:layer + 1](x), pool), 1)
        assert torch.allclose(backbone(x), ref, atol=1e-5)
    if (layer, pool) == (18, 1):  # the app's earlier setting: torchvision's own pooled features
        with torch.no_grad():
            ref = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(mobilenet.features(x), 1), 1)
        assert torch.allclose(backbone(x), ref, atol=1e-5)


def test_a_head_of_any_width_is_fresh_and_loads_only_its_own_shape():
    head = make_head(4704, seed=0)
    assert tuple(head_state(head)["1.weight"].shape) == (1, 4704)
    with pytest.raises(RuntimeError, match="size mismatch"):
        make_head(1280, state=head_state(head))


def test_the_conv1x1_head_reads_the_channel_major_map():
    """head='conv1x1': the cached (N, C*p*p) rows are the (C, p, p) map; a 1x1 convolution to 8
    channels, ReLU and a linear layer, computed here by hand."""
    head = make_head(96 * 49, kind="conv1x1", channels=96, seed=0)
    x = torch.randn(5, 96 * 49, generator=torch.Generator().manual_seed(1))
    conv, out = head.conv, head.out
    z = torch.relu(torch.einsum("kc,ncp->nkp", conv.weight[:, :, 0, 0], x.view(5, 96, 49)) + conv.bias[None, :, None])
    with torch.no_grad():
        assert torch.allclose(head(x), z.reshape(5, -1) @ out.weight.t() + out.bias, atol=1e-5)
    assert set(head_state(head)) == {"conv.weight", "conv.bias", "out.weight", "out.bias"}
    with pytest.raises(ValueError, match="is not channels=96 x pool x pool"):
        make_head(100, kind="conv1x1", channels=96)
    with pytest.raises(ValueError, match="kind='mlp' is not known"):
        make_head(10, kind="mlp")
