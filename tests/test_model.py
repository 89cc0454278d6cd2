import pytest
import torch

from celeba_app.config import ConfigError
from celeba_app.model import FEATURE_DIM, Backbone, SmileNet, head_state, load_mobilenet, make_head
from celeba_app.task import train_head


def test_backbone_weights_and_bn_statistics_are_bit_identical_after_training(weights_file):
    backbone = Backbone(load_mobilenet(str(weights_file)))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert any("running_mean" in k for k in before)  # BN buffers are part of what is checked
    model = SmileNet(backbone, make_head(seed=0))
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
    head = make_head(dropout=0.1, seed=3)
    state = head_state(head)
    assert set(state) == {"1.weight", "1.bias"}
    assert tuple(state["1.weight"].shape) == (1, FEATURE_DIM)
    assert torch.equal(state["1.weight"], head_state(make_head(seed=3))["1.weight"])
    assert not torch.equal(state["1.weight"], head_state(make_head(seed=4))["1.weight"])


def test_bad_weights_file_is_named(tmp_path):
    bad = tmp_path / "not_weights.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="is not a mobilenet_v2 state_dict"):
        load_mobilenet(str(bad))


def test_unreachable_imagenet_weights_are_one_clear_line(monkeypatch):
    from urllib.error import URLError

    from celeba_app import model

    def offline(weights=None):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(model, "mobilenet_v2", offline)
    with pytest.raises(ConfigError, match="weights='imagenet' could not be downloaded by torchvision"):
        load_mobilenet("imagenet")
