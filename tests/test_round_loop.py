"""The round loop: one record per round, failures survived and named, skipped rounds,
early stopping, resuming, and evaluate-with-train."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from celeba_app.config import RunConfig
from celeba_app.internals import set_src_node_id
from celeba_app.metrics import flatten, slice_stats
from celeba_app.protocol import Expected
from celeba_app.round_loop import NoClientTrained, RoundPolicy, RunFailed
from celeba_app.selection import BestRound
from celeba_app.strategy import make_strategy
from celeba_app.task import bce_per_row
from replies import ATTRIBUTES, honest_evaluate_metrics, honest_train, reply


class LoopGrid:
    """Nodes 1..3 whose train replies are built by ``train(node, round, msg)`` (a Message or
    an Error code); evaluate replies carry empty metrics."""

    def __init__(self, train):
        self.train, self.node_ids = train, {1, 2, 3}

    def get_node_ids(self):
        return sorted(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            nid = m.metadata.dst_node_id
            if m.metadata.message_type == "train":
                r = self.train(nid, int(m.content["config"]["server-round"]), m)
                if r is None:
                    continue  # no reply
                reply = Message(r, reply_to=m) if isinstance(r, Error) else Message(r.content, reply_to=m)
            else:  # an honest client without held-out rows
                metrics = honest_evaluate_metrics(nid, 0)
                reply = Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=m)
            set_src_node_id(reply, nid)
            out.append(reply)
        return out


def valid_report(losses):
    """server_evaluate returning a report whose loss is losses[round]."""
    def evaluate(rnd, arrays):
        return {"overall": {"loss": losses[rnd], "accuracy": 0.5, "auroc": None}, "gaps": {}}
    return evaluate


def trained(nid, rnd, msg, weight=None):
    return reply(weight if weight is not None else float(nid + rnd), 10, nid)


def run_loop(strategy, grid, rounds=4, losses=(1, 0.9, 0.8, 0.7, 0.6), patience=0, **kw):
    start = ArrayRecord({"1.weight": torch.zeros(1, 4), "1.bias": torch.zeros(1)})
    written = []
    result = strategy.start(grid, start, num_rounds=rounds, server_evaluate=valid_report(list(losses)),
                            best=BestRound("loss", patience),
                            on_round=lambda h, c: written.append((json.loads(json.dumps(h)), c)), **kw)
    return result, written


def test_early_stopping_really_stops():
    sent = []
    grid = LoopGrid(lambda nid, rnd, msg: sent.append(rnd) or trained(nid, rnd, msg))
    _, written = run_loop(make_strategy(RunConfig(), 3), grid, rounds=4, losses=(1, 0.5, 0.6, 0.7, 0.8),
                          patience=2)
    history = written[-1][0]
    assert [h["round"] for h in history] == [0, 1, 2, 3]  # stopped after round 3: no round 4 at all
    assert history[-1]["early_stopped"] and sorted(set(sent)) == [1, 2, 3]
    assert [c["round"] for _, c in written] == [0, 1, 2, 3]  # every round written as it ended


def test_a_round_is_written_before_its_log_line_announces_it():
    """A run killed right after its "round N" line must resume after round N, not N-1."""
    saved, announced_unsaved = [], []

    class Announcements(logging.Handler):
        def emit(self, record):
            m = re.match(r"celeba-fl: round (\d+)/", record.getMessage())
            if m and int(m.group(1)) not in saved:
                announced_unsaved.append(int(m.group(1)))

    handler, logger = Announcements(), logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        make_strategy(RunConfig(), 3).start(
            LoopGrid(trained), ArrayRecord({"1.weight": torch.zeros(1, 4), "1.bias": torch.zeros(1)}),
            num_rounds=3, server_evaluate=valid_report([1, 0.9, 0.8, 0.7]), best=BestRound("loss", 0),
            on_round=lambda history, checkpoint: saved.append(checkpoint["round"]))
    finally:
        logger.removeHandler(handler)
    assert saved == [0, 1, 2, 3] and announced_unsaved == []


def test_a_failing_client_is_survived_and_recorded():
    def train(nid, rnd, msg):
        return Error(code=2, reason="celeba-fl: row 7 of client-2/train cannot be decoded") \
            if nid == 2 and rnd == 2 else Message(honest_train(msg, nid * 10, 10), dst_node_id=nid, message_type="train")
    _, written = run_loop(make_strategy(RunConfig(), 3), LoopGrid(train), rounds=3,
                          nodes={nid: Expected(nid * 10, 10, 0, ATTRIBUTES) for nid in (1, 2, 3)})
    r2 = written[-1][0][2]
    assert r2["nodes"]["train"]["sampled"] == [1, 2, 3] and r2["nodes"]["train"]["succeeded"] == 2
    assert r2["nodes"]["train"]["failures"] == [{"node_id": 2, "partition_id": 20, "code": 2,
                                                 "reason": "row 7 of client-2/train cannot be decoded"}]
    assert r2["train"]["num_clients"] == 2 and not r2.get("skipped")


def test_rounds_without_enough_replies_are_skipped_then_the_run_fails():
    def train(nid, rnd, msg):
        return trained(nid, rnd, msg) if rnd == 1 else (None if nid == 3 else Error(code=2, reason="boom"))
    strategy = make_strategy(RunConfig(), 3)
    with pytest.raises(RunFailed, match="3 rounds in a row skipped .max-skipped-rounds=2.; last: 0 of 3"):
        run_loop(strategy, LoopGrid(train), rounds=5, policy=RoundPolicy(round_timeout=1, max_skipped_rounds=2))
    result, written = run_loop(make_strategy(RunConfig(), 3), LoopGrid(train), rounds=3,
                               policy=RoundPolicy(round_timeout=1, max_skipped_rounds=5))
    history = written[-1][0]
    assert history[2]["skipped"] and history[3]["skipped"]
    assert {"node_id": 3, "partition_id": None, "code": None,
            "reason": "no reply within round-timeout=1s"} in history[2]["nodes"]["train"]["failures"]
    after_round_1 = written[1][1]["arrays"]
    assert all(torch.equal(result.arrays.to_torch_state_dict()[k], v) for k, v in after_round_1.items())


def test_no_client_training_in_round_1_ends_the_run_with_their_errors():
    grid = LoopGrid(lambda nid, rnd, msg: Error(code=2, reason="celeba-fl: data-path='/x': no such folder"))
    with pytest.raises(NoClientTrained, match="node 1: data-path='/x': no such folder"):
        run_loop(make_strategy(RunConfig(), 3), grid, rounds=3)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fairfed"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_head(name):
    """The checkpoint holds the server's state (FedAvgM momentum, FedAdam moments): a strategy
    restored after round 2 ends where an uninterrupted one does."""
    grid = LoopGrid(lambda nid, rnd, msg: trained(nid, rnd, msg, weight=float(nid * rnd % 5)))
    cfg = RunConfig.from_run_config({"strategy": name})
    full, _ = run_loop(make_strategy(cfg, 3), grid, rounds=4)
    _, written = run_loop(make_strategy(cfg, 3), grid, rounds=2)
    checkpoint = torch.load(_saved(written[-1][1]), weights_only=True)
    checkpoint["history"] = written[-1][0]  # server_app adds what results.read_history gives
    resumed, rest = run_loop(make_strategy(cfg, 3), grid, rounds=4, resume=checkpoint)
    assert [h["round"] for h in rest[-1][0]] == [0, 1, 2, 3, 4]
    for k, v in full.arrays.to_torch_state_dict().items():
        assert (resumed.arrays.to_torch_state_dict()[k] - v).abs().max() < 1e-6, k
    if name != "fedavg":  # the server state matters: without it, round 3 differs
        fresh, _ = run_loop(make_strategy(cfg, 3), grid, rounds=4,
                            resume={**checkpoint, "server_state": {}})
        assert not torch.allclose(fresh.arrays.to_torch_state_dict()["1.weight"],
                                  full.arrays.to_torch_state_dict()["1.weight"])


def _saved(checkpoint):
    import io

    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    buf.seek(0)
    return buf


class HeldOutGrid(LoopGrid):
    """LoopGrid whose clients evaluate a head as a function of (node, head): by evaluate
    messages, or in a train reply's ``evaluate_received`` record when the config asks."""

    def __init__(self):
        super().__init__(self._train)
        self.sent = []  # (round, message type)

    @staticmethod
    def held_out(nid, msg) -> dict:
        w = float(msg.content["arrays"].to_torch_state_dict()["1.weight"].mean())
        rng = np.random.default_rng(nid)
        y, p = rng.integers(0, 2, 40), np.clip(rng.random(40) * 0.5 + 0.25 + w / 20, 0, 1)
        return {"num-examples": 40, "partition_id": nid, **flatten(slice_stats(p, y, bce_per_row(p, y),
                                                                               {"Male": y ^ 1}))}

    def _train(self, nid, rnd, msg):
        out = trained(nid, rnd, msg)
        if msg.content["config"]["evaluate-received"]:
            out.content["evaluate_received"] = ConfigRecord(self.held_out(nid, msg))
        return out

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += [(int(m.content["config"]["server-round"]), m.metadata.message_type) for m in messages]
        evaluate = [m for m in messages if m.metadata.message_type == "evaluate"]
        out = super().send_and_receive([m for m in messages if m not in evaluate])
        for m in evaluate:
            r = Message(RecordDict({"metrics": MetricRecord(self.held_out(m.metadata.dst_node_id, m))}), reply_to=m)
            set_src_node_id(r, m.metadata.dst_node_id)
            out.append(r)
        return out


@pytest.mark.parametrize("patience", [0, 1])
def test_evaluate_with_train_gives_every_round_the_federated_evaluation_of_separate_messages(patience):
    """One message per client per round (the next train message evaluates the received head),
    plus evaluate messages for the last head only; every round's federated evaluation is the
    one that evaluate messages give, also when early stopping ends the run."""
    losses = (1, 0.9, 0.95, 0.99, 0.99)  # patience 1: stops after round 2
    runs = {}
    for fold in (False, True):
        grid = HeldOutGrid()
        _, written = run_loop(make_strategy(RunConfig(), 3), grid, rounds=4, losses=losses, patience=patience,
                              policy=RoundPolicy(evaluate_with_train=fold))
        runs[fold] = (grid.sent, written[-1][0])
    (sent_sep, hist_sep), (sent_fold, hist_fold) = runs[False], runs[True]
    last = hist_sep[-1]["round"]
    assert last == (2 if patience else 4) and hist_fold[-1]["round"] == last
    assert [t for _, t in sent_sep].count("evaluate") == 3 * last
    assert [(r, t) for r, t in sent_fold if t == "evaluate"] == [(last, "evaluate")] * 3
    assert [t for _, t in sent_fold].count("train") == 3 * last
    for sep, fold in zip(hist_sep[1:], hist_fold[1:]):
        assert fold["federated_evaluate"]["overall"]["n"] == 120
        assert fold["federated_evaluate"] == sep["federated_evaluate"], sep["round"]




def test_each_round_records_its_learning_rate_and_the_bytes_it_sent():
    _, written = run_loop(make_strategy(RunConfig.from_run_config({"lr-decay": 0.5}), 3), LoopGrid(trained), rounds=2)
    r1, r2 = written[-1][0][1:]
    assert (r1["lr"], r2["lr"]) == (pytest.approx(0.005), pytest.approx(0.0025))  # lr * decay^(round-1)
    assert r2["head_bytes"] == (4 + 1) * 4 and r2["bytes_sent"] == 3 * r2["head_bytes"]
    assert r2["train"]["num_clients"] == 3 and r2["nodes"]["evaluate"]["sampled"] == [1, 2, 3]


# ---------------------------------------------------------------------- untrusted clients
HONEST = {nid: Expected(nid, 20, 8, ATTRIBUTES) for nid in (1, 2, 3)}


def _set(key, value):
    def mutate(content):
        content["metrics"][key] = value
    return mutate


def _scale_arrays(factor=None, value=None, shape=None):
    def mutate(content):
        state = content["arrays"].to_torch_state_dict()
        w = state["1.weight"]
        if value is not None:
            w = torch.full_like(w, value) if value != "one-nan" else w.clone().index_fill_(1, torch.tensor([0]), float("nan"))
        if factor is not None:
            w = w * factor
        if shape is not None:
            w = w.reshape(shape) if shape != "T" else w.T.contiguous()
        state["1.weight"] = w
        content["arrays"] = ArrayRecord(state)
    return mutate


def _forge(*keys, add):
    """Add ``add`` to each of ``keys`` (a histogram's every bin when it is a list)."""
    def mutate(content, record="metrics"):
        rec = content[record] if record in content else content.config_records[record]
        for key in keys:
            value = rec[key]
            rec[key] = [v + add for v in value] if isinstance(value, list) else value + add
    return mutate


def _drop(key):
    def mutate(content):
        del content["metrics"][key]
    return mutate


ATTACKS = {  # name: (phase, how the reply is altered, what the refusal says)
    "one NaN weight": ("train", _scale_arrays(value="one-nan"), "non-finite values"),
    "all weights Inf": ("train", _scale_arrays(value=float("inf")), "non-finite values"),
    "head of another shape": ("train", _scale_arrays(shape=(1, 2, 2)), "head array '1.weight' is float32[1, 2, 2]"),
    "transposed head": ("train", _scale_arrays(shape="T"), "head array '1.weight' is float32[4, 1]"),
    "weights x1e30": ("train", _scale_arrays(factor=1e30), "update norm"),
    "negative confusion count": ("train", _set("all|tp", -3.0), "all|tp=-3.0 is not a finite number >= 0"),
    "a metric key missing": ("train", _drop("local_steps_loss"), "metric keys"),
    "an extra metric key": ("train", _set("bonus", 1.0), "metric keys"),
    "a slice missing": ("train", _drop("Male=1|tp"), "slice statistics differ"),
    "num-examples 1e12": ("train", _set("num-examples", 1e12), "num-examples=1000000000000.0"),
    "num-examples -140": ("train", _set("num-examples", -140), "num-examples=-140"),
    "another partition id": ("train", _set("partition_id", 3), "partition_id=3; this node described partition 2"),
    "Male=1 fp and n +1e6": ("train", _forge("Male=1|fp", "Male=1|n", "all|fp", "all|n", "num-examples", add=1e6),
                             "num-examples"),
    "Male=1 fp and n +1e6, sizes kept": ("train", _forge("Male=1|fp", "Male=1|n", add=1e6), "score histograms"),
    "Male=1 fp +1e6": ("train", _forge("Male=1|fp", add=1e6), "tp+fp+tn+fn"),
    "evaluate histograms +1e4": ("evaluate", _forge("all|hist_pos", add=1e4), "score histograms"),
    "NaN loss": ("train", _set("local_steps_loss", float("nan")), "local_steps_loss=nan"),
}


class UntrustedGrid(LoopGrid):
    """Nodes 1..3 that reply as honest clients (20 training rows, 8 held out), except node 2
    in ``phase``: it alters its reply with ``mutate``, or (``mutate`` None) sends an error,
    i.e. the run without the offender's reply."""

    def __init__(self, phase, mutate):
        super().__init__(self._train)
        self.phase, self.mutate = phase, mutate

    def _reply(self, nid, phase, content):
        if nid == 2 and phase == self.phase:
            if self.mutate is None:
                return Error(code=2, reason="left out")
            self.mutate(content)
        return content

    def _train(self, nid, rnd, msg):
        r = self._reply(nid, "train", honest_train(msg, nid, 20, 8))
        return r if isinstance(r, Error) else Message(r, dst_node_id=nid, message_type="train")

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        evaluate = [m for m in messages if m.metadata.message_type == "evaluate"]
        out = super().send_and_receive([m for m in messages if m not in evaluate])
        for m in evaluate:
            nid = m.metadata.dst_node_id
            content = self._reply(nid, "evaluate", RecordDict({"metrics": MetricRecord(honest_evaluate_metrics(nid, 8))}))
            r = Message(content, reply_to=m) if isinstance(content, Error) else Message(content, reply_to=m)
            set_src_node_id(r, nid)
            out.append(r)
        return out


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_reply_that_breaks_the_protocol_is_refused_named_and_changes_nothing(attack, caplog):
    """The offender's reply is dropped before aggregation and named (node, partition, rule);
    the run completes with the head and the fairness figures of the run without that reply."""
    phase, mutate, says = ATTACKS[attack]
    runs = {}
    for name, m in (("attacked", mutate), ("without", None)):
        with caplog.at_level(logging.WARNING, logger="flwr"):
            result, written = run_loop(make_strategy(RunConfig(), 3), UntrustedGrid(phase, m), rounds=2, nodes=HONEST)
        runs[name] = (result, written[-1][0])
    (attacked, history), (clean, clean_history) = runs["attacked"], runs["without"]
    assert [h["round"] for h in history] == [0, 1, 2]
    for rnd in (1, 2):
        [failure] = history[rnd]["nodes"][phase]["failures"]
        assert failure["node_id"] == 2 and failure["partition_id"] == 2 and failure["refused"]
        assert failure["reason"].startswith("reply refused: ") and says in failure["reason"], failure["reason"]
        for key in ("train", "federated_evaluate"):
            assert history[rnd][key] == clean_history[rnd][key], (rnd, key)
    assert any("node 2 (partition 2): reply refused: " in r.getMessage() for r in caplog.records)
    for k, v in clean.arrays.to_torch_state_dict().items():
        assert torch.equal(attacked.arrays.to_torch_state_dict()[k], v), k


def test_honest_replies_pass_every_check_in_every_mode():
    """FairFed's global-model statistics and evaluate-with-train's held-out record included."""
    for overrides, policy in (({}, RoundPolicy()), ({"strategy": "fairfed"}, RoundPolicy(evaluate_with_train=True))):
        _, written = run_loop(make_strategy(RunConfig.from_run_config(overrides), 3), UntrustedGrid("none", None),
                              rounds=2, nodes=HONEST, policy=policy)
        for entry in written[-1][0][1:]:
            assert all(not phase["failures"] for phase in entry["nodes"].values()), entry["nodes"]
            assert entry["federated_evaluate"]["overall"]["n"] == 24


def test_a_node_that_rejoins_under_a_new_id_is_checked_as_the_partition_it_was():
    """The grid says node 2 came back as node 9 (federation.FederationGrid.rejoin): round 2's
    replies of node 9 are held to partition 2's description, and none is refused."""
    class RejoinGrid(UntrustedGrid):
        pid = {1: 1, 2: 2, 3: 3, 9: 2}

        def rejoin(self):
            if self.rounds_seen == 1:
                self.node_ids = {1, 3, 9}
                return {2: 9}
            return {}

        def _train(self, nid, rnd, msg):
            self.rounds_seen = rnd
            return Message(honest_train(msg, self.pid[nid], 20, 8), dst_node_id=nid, message_type="train")

        def send_and_receive(self, messages, *, timeout=None):
            out = super().send_and_receive(messages)
            for r in out:  # evaluate replies name the partition, not the node
                if r.metadata.message_type == "evaluate" and not r.has_error():
                    r.content["metrics"]["partition_id"] = self.pid[r.metadata.src_node_id]
            return out

    grid = RejoinGrid("none", None)
    grid.rounds_seen = 0
    _, written = run_loop(make_strategy(RunConfig(), 3), grid, rounds=2, nodes=dict(HONEST))
    r2 = written[-1][0][2]
    assert r2["nodes"]["train"]["sampled"] == [1, 3, 9]
    assert not r2["nodes"]["train"]["failures"] and not r2["nodes"]["evaluate"]["failures"]
