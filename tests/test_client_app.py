"""The ClientApp's train/evaluate handlers, called as Flower calls them."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from celeba_app import client_app
from celeba_app.config import RunConfig
from celeba_app.metrics import unflatten
from celeba_app.model import head_for


def call(handler, run_config, pid=0, num=3, message_type="train", **config):
    head = head_for(RunConfig.from_run_config(run_config), seed=0)
    content = RecordDict({"arrays": ArrayRecord(head.state_dict()),
                          "config": ConfigRecord({"server-round": 1, "lr": 0.01, **config})})
    msg = Message(content=content, dst_node_id=1, message_type=message_type)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": num},
                  state=RecordDict(), run_config=run_config)
    return handler(msg, ctx), head


def test_train_sends_back_only_the_head_and_summable_metrics(run_config, monkeypatch):
    replies = []
    monkeypatch.setattr(client_app, "Message", lambda content, reply_to: replies.append(content) or content)
    content, sent = call(client_app.train, run_config)
    arrays = content["arrays"].to_torch_state_dict()
    # head only (the default conv1x1 on conftest.TINY's features[13] pooled 2x2): no backbone tensor travels
    assert {k: tuple(v.shape) for k, v in arrays.items()} == {
        "conv.weight": (8, 96, 1, 1), "conv.bias": (8,), "out.weight": (1, 8 * 2 * 2), "out.bias": (1,)}
    assert not torch.equal(arrays["out.weight"], sent.state_dict()["out.weight"])  # it trained
    metrics = content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["local_steps_loss"] > 0
    stats = unflatten(metrics)
    assert stats["all"].n == metrics["num-examples"]
    assert {"Male=0", "Male=1", "Male=0&Young=1", "Young=1&Pale_Skin=0"} <= set(stats)


def test_evaluate_reports_local_validation_counts(run_config, monkeypatch):
    monkeypatch.setattr(client_app, "Message", lambda content, reply_to: content)
    content, _ = call(client_app.evaluate, run_config, pid=1, message_type="evaluate")
    assert "arrays" not in content
    metrics = content["metrics"]
    stats = unflatten(metrics)
    assert stats["all"].n == metrics["num-examples"]
    assert stats["all"].tp + stats["all"].fp + stats["all"].tn + stats["all"].fn == stats["all"].n
    assert np.sum(stats["all"].hist_pos) == stats["all"].pos


def test_train_asked_to_evaluate_the_received_head_reports_what_evaluate_would(run_config, monkeypatch):
    """evaluate-with-train: the train reply's ``evaluate_received`` record holds the statistics the
    evaluate handler computes for the same head and node, taken before the head trains."""
    monkeypatch.setattr(client_app, "Message", lambda content, reply_to: content)
    evaluated, _ = call(client_app.evaluate, run_config, pid=1, message_type="evaluate")
    trained, _ = call(client_app.train, run_config, pid=1, **{"evaluate-received": True})
    assert dict(trained["evaluate_received"]) == dict(evaluated["metrics"])
    assert "evaluate_received" not in call(client_app.train, run_config, pid=1)[0]


def test_with_dp_the_query_reply_carries_salted_hashes_not_celeb_ids(run_config, monkeypatch):
    from celeba_app import protocol as P

    monkeypatch.setattr(client_app, "Message", lambda content=None, reply_to=None, error=None: content or error)
    dp = {**run_config, "dp": "server-fixed"}
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config=dp)
    reply = client_app.query(Message(P.query_content("salt"), dst_node_id=1, message_type="query"), ctx)
    entry = P.parse_description(reply[P.DESCRIPTION])
    assert "celeb_ids" not in entry and len(entry["celeb_id_hashes"]) > 0
    error = client_app.query(Message(P.query_content(None), dst_node_id=1, message_type="query"), ctx)
    assert "asks for this node's celeb_ids in the clear (no id-salt)" in error.reason


def test_the_dp_clipping_mod_clips_the_reply_and_says_whether_it_did():
    from flwr.app import MetricRecord

    from celeba_app import protocol as P

    sent = ArrayRecord({"w": torch.zeros(100)})
    for adaptive in (False, True):
        config = ConfigRecord({P.CLIPPING_NORM: 0.5, **({P.NORM_BIT: True} if adaptive else {})})
        msg = Message(RecordDict({"arrays": sent, "config": config}), dst_node_id=1, message_type="train")

        def trained(m, context):
            return Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((100,), 1.0)}),
                                       "metrics": MetricRecord({"num-examples": 3})}), reply_to=m)
        reply = client_app.client_clipping_mod(msg, None, trained)
        w = reply.content["arrays"]["w"].numpy()
        assert np.linalg.norm(w) == pytest.approx(0.5, rel=1e-5)
        assert (P.CLIPPED in reply.content["metrics"]) == adaptive
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="query")
    assert client_app.client_clipping_mod(query, None, lambda m, c: "passed") == "passed"
