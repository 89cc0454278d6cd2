"""A ClientApp for the untrusted-client simulations: the app's own ClientApp, except that the
partitions named in ``ALTER`` alter one phase's reply (``MODE = "attack"``) or answer it with
an error (``MODE = "error"``: the run without the offender's reply). An attack "sleep <s>"
replies honestly after ``s`` seconds (a slow client).

``copy_app`` (this package) copies this file beside a copy of pyproject.toml whose
``clientapp`` points here, and sets the two constants in the copy; nothing here is part of the app.
"""

import math
import time

import torch
from flwr.app import ArrayRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from celeba_app.client_app import app as honest

MODE = "attack"
ALTER = {}  # partition id: (phase, attack name), set by the test


def _attack(content, name: str) -> None:
    metrics = content["metrics"]
    if name.startswith("sleep "):  # "sleep 45": a slow or stuck client, whose reply is honest
        time.sleep(float(name.split()[1]))
    elif name == "one NaN weight":
        state = content["arrays"].to_torch_state_dict()
        key = next(iter(state))
        state[key] = state[key].clone()
        state[key].view(-1)[0] = math.nan
        content["arrays"] = ArrayRecord(state)
    elif name == "head of another shape":
        state = content["arrays"].to_torch_state_dict()
        key = next(iter(state))
        state[key] = torch.zeros(1, 10)
        content["arrays"] = ArrayRecord(state)
    elif name == "num-examples 1e12":
        metrics["num-examples"] = 1e12
    elif name == "a metric key missing":
        del metrics["local_steps_loss"]
    elif name == "evaluate histograms +1e4":
        metrics["all|hist_pos"] = [v + 1e4 for v in metrics["all|hist_pos"]]
    else:
        raise ValueError(f"no attack {name!r}")


def _handled(phase: str):
    def handler(msg: Message, context: Context) -> Message:
        what = ALTER.get(int(context.node_config["partition-id"]))
        if what is None or what[0] != phase:
            return honest(msg, context)
        if MODE == "error":
            return Message(error=Error(code=0, reason="left out by the test"), reply_to=msg)
        reply = honest(msg, context)
        _attack(reply.content, what[1])
        return reply
    return handler


app = ClientApp()
app.query()(lambda msg, context: honest(msg, context))
app.train()(_handled("train"))
app.evaluate()(_handled("evaluate"))
