"""The path of one client message through the app's modules: which modules it visits, how many
times it enters each, and how often a call climbs back up the import floors.

    python scripts/message_path.py            # a train message, an evaluate message, a round

It builds a small CelebA-schema dataset (celeba_app.demo_data) and random MobileNetV2
weights in a temporary folder, answers one ``query``, then traces one ``train`` and one
``evaluate`` message through ``client_app``'s handlers in this process (``sys.setprofile``),
with a warm cache (each handler called once before), as a later round finds it. Then one
server round (``strategy.start`` for one round, the server's evaluation on ``valid`` as
server_app's), over a grid whose nodes are those same handlers, untraced: the server's
side of a round. A module's *floor* is its height in the app's
import graph (a module that imports no other app module is floor 0; every module is above
what it imports); a *climb* is a call from a module into one on a higher floor, which the
acyclic imports allow only through a function passed down (a callback). Printed: the modules
in the order first entered, with entries and floor; the number of modules; the climbs.
"""

from __future__ import annotations

import ast
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACKAGE = ROOT / "celeba_app"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_floors() -> dict[str, int]:
    """{module: floor} from the app's intra-package imports (ast, relative and absolute)."""
    deps: dict[str, set[str]] = {}
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                     for n in ast.walk(block)}  # imports for annotations only: no runtime dependency
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    for cand in (f"{base}.{alias.name}", base):
                        if cand in modules and cand != name:
                            found.add(cand)
                            break
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules and a.name != name}
        deps[name] = found
    floors: dict[str, int] = {}

    def floor(m: str, seen=()) -> int:
        if m not in floors:
            floors[m] = 1 + max((floor(d, seen + (m,)) for d in deps[m] if d not in seen), default=-1)
        return floors[m]

    for m in deps:
        floor(m)
    return floors


def trace(fn):
    """Run ``fn()``; every call from one celeba_app module into another, as (caller module,
    callee module), in order. The caller is the nearest app frame below the callee's (a call
    that passes through a library, e.g. a callback, counts from the app module that made it)."""
    transitions = []

    def profile(frame, event, arg):
        if event != "call":
            return
        mod = frame.f_globals.get("__name__", "")
        if not mod.startswith("celeba_app"):
            return
        caller = frame.f_back
        while caller is not None and not caller.f_globals.get("__name__", "").startswith("celeba_app"):
            caller = caller.f_back
        src = caller.f_globals["__name__"] if caller is not None else None
        if src != mod:
            transitions.append((src, mod))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return transitions


def main() -> None:
    import torch
    import torchvision
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from celeba_app import client_app
    from celeba_app.config import RunConfig
    from celeba_app.demo_data import make_celeba
    from celeba_app.model import head_for

    work = Path(tempfile.mkdtemp(prefix="celeba-fl-message-path-"))
    data = make_celeba(work / "data")
    torch.manual_seed(0)
    weights = work / "w.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    run_config = {"dataset": str(data), "weights": str(weights), "image-size": 32, "feature-layer": 13,
                  "feature-pool": 2, "local-epochs": 1, "cache-dir": str(work / "cache")}
    head = head_for(RunConfig.from_run_config(run_config), seed=0)
    client_app.Message = lambda content=None, reply_to=None, error=None: content  # replies need a SuperLink

    def message(kind: str):
        content = RecordDict({"arrays": ArrayRecord(head.state_dict()),
                              "config": ConfigRecord({"server-round": 1, "lr": 0.01})})
        msg = Message(content=content, dst_node_id=1, message_type=kind)
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=run_config)
        return msg, ctx

    client_app.query(*message("query"))
    client_app.train(*message("train"))  # round 1: embeds and caches both parts
    client_app.evaluate(*message("evaluate"))
    floors = import_floors()
    for kind, handler in (("train", client_app.train), ("evaluate", client_app.evaluate)):
        show(f"one {kind} message (warm cache)", trace(lambda: handler(*message(kind))), floors)
    show("one server round (the clients' handlers untraced)", trace(one_round(run_config, message)), floors)


def one_round(run_config: dict, message):
    """A function that runs ``strategy.start`` for one round over three nodes that are
    client_app's handlers (run untraced), with server_app's evaluation of the global head on
    ``valid`` (its embeddings computed before, as server_app's log_plan does)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message

    from celeba_app import client_app
    from celeba_app.config import RunConfig
    from celeba_app.data import server_part
    from celeba_app.features import feature_store
    from celeba_app.internals import set_src_node_id
    from celeba_app.model import head_for
    from celeba_app.selection import BestRound
    from celeba_app.strategy import make_strategy
    from celeba_app.task import evaluate_report

    cfg = RunConfig.from_run_config(run_config)
    store, valid = feature_store(cfg, "cpu"), server_part(cfg, "valid")
    store.for_part(valid)

    class Grid:
        node_ids = {1, 2, 3}

        def get_node_ids(self):
            return sorted(self.node_ids)

        def send_and_receive(self, messages, *, timeout=None):
            profile = sys.getprofile()
            sys.setprofile(None)
            try:
                out = []
                for m in messages:
                    m.metadata.__dict__["_message_id"] = m.object_id
                    nid = m.metadata.dst_node_id
                    _, ctx = message("train")
                    ctx.node_config["partition-id"] = nid - 1
                    handler = client_app.train if m.metadata.message_type == "train" else client_app.evaluate
                    reply = Message(handler(m, ctx), reply_to=m)
                    set_src_node_id(reply, nid)
                    out.append(reply)
                return out
            finally:
                sys.setprofile(profile)

    def evaluate_valid(server_round, arrays):
        head = head_for(cfg, state=arrays.to_torch_state_dict())
        return evaluate_report(head, store.for_part(valid), valid.labels, valid.attributes, "valid",
                               cfg.min_group_size, "cpu")

    strategy, start = make_strategy(cfg, 3), ArrayRecord(head_for(cfg, seed=0).state_dict())
    return lambda: strategy.start(Grid(), start, num_rounds=1, train_config=ConfigRecord({"lr": cfg.learning_rate}),
                                  server_evaluate=evaluate_valid, best=BestRound())


def show(title: str, transitions: list, floors: dict[str, int]) -> None:
    """The modules a trace entered (in order, with floor and entries), their count, the climbs."""
    entries = Counter(callee for _, callee in transitions)
    order = list(dict.fromkeys(callee for _, callee in transitions))
    climbs = [(a, b) for a, b in transitions if a and floors.get(b, 0) > floors.get(a, 0)]
    print(f"## {title}")
    print("| module | floor | entered |")
    print("|---|---|---|")
    for m in order:
        print(f"| {m} | {floors.get(m)} | {entries[m]} |")
    packages = {m.split(".")[1] if m.count(".") else m for m in order}
    print(f"\n{len(order)} modules ({len(packages)} top-level modules or packages), {len(climbs)} climbs"
          + (": " + ", ".join(f"{a} -> {b}" for a, b in climbs) if climbs else "") + "\n")


if __name__ == "__main__":
    main()
