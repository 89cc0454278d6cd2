"""Client-level differential privacy: Flower's DP wrappers around the app's strategy, and the
privacy budget they spend.

The privacy unit is one client's whole data. ``dp`` (run config) picks one of Flower 1.25's
Message-API wrappers (``flwr.serverapp.strategy``); the clipping of ``client-*`` modes is
Flower's own client mod (client_app.client_clipping_mod). Each round the wrapper clips every
client's head update to L2 norm ``C`` (``dp-clipping-norm``; adaptive: the initial norm) and adds Gaussian
noise of standard deviation ``noise_multiplier * C / m`` to the mean of the ``m`` heads the
round aggregated. What the guarantee needs around Flower 1.25's wrappers is made true here:

* the mean is unweighted: each reply counts once, whatever its ``num-examples`` (FedAvg's
  example weights would give one client up to the whole mean, not ``1 / m`` of it);
* ``m`` is the number of replies actually aggregated (those with training rows), not the
  number sampled, so a round with failures gets the noise its own mean needs;
* the noise is that of the norm the round's updates were clipped to (Flower's adaptive
  wrapper adapts the norm first);
* an update of norm 0 is aggregated as it is (Flower's server-side clipping divides by it).

The noise comes from numpy's global generator as Flower draws it, never seeded by the app: a
seed in the run config would let anyone who reads it subtract the noise. DP runs are therefore
not reproducible bit for bit, resumed or not.

The budget (``Budget``) is that of the sampled Gaussian mechanism, composed over the rounds,
by dp-accounting's RDP accountant: Poisson sampling with rate ``q`` = the share of nodes a
round samples (``fraction-train``), noise multiplier ``z`` (the total one; Flower's adaptive
wrapper splits it between the heads and the clipped-count query). Flower samples a fixed-size
subset rather than each node with probability ``q``; the accounting follows DP-FedAvg
(McMahan et al., 2018) in treating the two alike. epsilon covers the released heads only: the
clients' metric replies (confusion counts and score histograms per group) and their
descriptions are not privatised (``COVERS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping)

from . import protocol as P
from .config import ConfigError
from .strategy import GroupMetrics

#: what epsilon covers, in one sentence (report.md, the log)
COVERS = ("epsilon covers the global heads the server releases after each round (client-level: "
          "one client's whole data); the clients' metric replies (confusion counts and score "
          "histograms per group) and their descriptions (sizes, group rates) are not privatised.")

#: largest noise multiplier dp-target-epsilon may ask for: beyond it the noise on the mean of
#: the heads is many times their clipped norm, and no head is learnt
MAX_NOISE_MULTIPLIER = 100.0


def sampled_per_round(num_nodes: int, fraction: float) -> int:
    """How many nodes a round samples (Flower's strategies: ``int(n * fraction)``, at least 1)."""
    return max(1, int(num_nodes * fraction))


@dataclass(frozen=True)
class Budget:
    """The sampled Gaussian mechanism of one run: noise multiplier ``z``, sampling rate ``q``
    (0 < q <= 1), ``delta`` (0 < delta < 1)."""

    noise_multiplier: float
    sampling_rate: float
    delta: float

    def epsilon(self, rounds: int) -> float:
        """epsilon at ``delta`` after ``rounds`` rounds, by the RDP accountant (inf for z = 0)."""
        return rdp_epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta)

    def record(self, rounds: int, wrapper) -> dict:
        """A round's ``dp`` entry (history.json): epsilon after ``rounds`` rounds at ``delta``,
        the noise multiplier, the sampling rate, and the norm ``wrapper`` (this module's DP
        wrapper) clipped the last aggregated round's updates to."""
        clipped_to = getattr(wrapper, "clipped_to", None)
        return {"epsilon": self.epsilon(rounds), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate, "clipping_norm": None if clipped_to is None else float(clipped_to)}


def _event(noise_multiplier: float, q: float, rounds: int):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, gaussian), rounds)


def rdp_epsilon(noise_multiplier: float, q: float, rounds: int, delta: float) -> float:
    """epsilon of ``rounds`` compositions of the Poisson-sampled Gaussian mechanism, RDP accountant."""
    from dp_accounting import rdp

    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = rdp.RdpAccountant()
    accountant.compose(_event(noise_multiplier, q, rounds))
    return float(accountant.get_epsilon(delta))


def pld_epsilon(noise_multiplier: float, q: float, rounds: int, delta: float) -> float:
    """The same epsilon by dp-accounting's PLD accountant (tighter; the tests' cross-check)."""
    from dp_accounting import pld

    accountant = pld.PLDAccountant()
    accountant.compose(_event(noise_multiplier, q, rounds))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, q: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` is at most ``target_epsilon``
    (RDP accountant); ConfigError (one line) when it would exceed ``MAX_NOISE_MULTIPLIER``."""
    import dp_accounting
    from dp_accounting import rdp

    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"dp-target-epsilon={target_epsilon!r} is not valid; accepted: a finite number > 0")
    if rdp_epsilon(MAX_NOISE_MULTIPLIER, q, rounds, delta) > target_epsilon:
        raise ConfigError(
            f"dp-target-epsilon={target_epsilon:g} cannot be met within num-server-rounds={rounds}: even noise "
            f"multiplier {MAX_NOISE_MULTIPLIER:g} spends epsilon="
            f"{rdp_epsilon(MAX_NOISE_MULTIPLIER, q, rounds, delta):.3g} (sampling rate {q:.3g}, dp-delta="
            f"{delta:.3g}); accepted: a larger dp-target-epsilon, fewer rounds, or more nodes sampled less often")
    return float(dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, lambda z: _event(z, q, rounds), target_epsilon, delta,
        dp_accounting.mechanism_calibration.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-4))


def budget_for(cfg, num_nodes: int, num_train_images: int) -> Budget:
    """The run's Budget: its noise multiplier (solved from dp-target-epsilon when that is set),
    its sampling rate, and dp-delta (0: 1 / the clients' training images)."""
    q = sampled_per_round(num_nodes, cfg.fraction_train) / num_nodes
    delta = cfg.dp_delta or 1.0 / max(num_train_images, 1)
    if not 0 < delta < 1:
        raise ConfigError(f"dp-delta={delta!r} is not valid; accepted: 0 < x < 1")
    z = cfg.dp_noise_multiplier
    if cfg.dp_target_epsilon:
        z = noise_for_epsilon(cfg.dp_target_epsilon, q, cfg.num_server_rounds, delta)
    return Budget(noise_multiplier=z, sampling_rate=q, delta=delta)


# ---------------------------------------------------------------------- Flower's wrappers, fitted
class _FittedWrapper:
    """Mixin for Flower's DP wrappers: the round loop's calls beyond Flower's Strategy go to
    the wrapped strategy; ``start`` runs the app's loop over the wrapper; the noise is scaled
    to the replies aggregated; the adaptive clipping norm is server state."""

    def __getattr__(self, name):  # only for what the wrapper itself does not define
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    start = GroupMetrics.start  # the app's round loop, over the wrapper

    clipped_to: float | None = None  #: the clipping norm of the last aggregated round

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = [m for m in replies if not m.has_error()]
        if not replies:
            return None, None
        self.num_sampled_clients = max(1, sum(P.reply_metrics(m.content)[P.NUM_EXAMPLES] > 0 for m in replies))
        self.clipped_to = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Flower's noise, for the norm this round's updates were clipped to: Flower's adaptive
        wrappers adapt the norm before they add the noise, which under-noises a round whose
        norm shrinks."""
        adapted, self.clipping_norm = self.clipping_norm, self.clipped_to
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = adapted

    def server_state(self) -> dict:
        import torch

        state = self.strategy.server_state()
        state["dp_clipping_norm"] = torch.tensor(float(self.clipping_norm), dtype=torch.float64)
        return state

    def restore_server_state(self, state: dict) -> None:
        state = dict(state)
        if "dp_clipping_norm" in state:
            self.clipping_norm = float(state.pop("dp_clipping_norm"))
        self.strategy.restore_server_state(state)


class ServerSideFixedClipping(_FittedWrapper, DifferentialPrivacyServerSideFixedClipping):
    """``dp = "server-fixed"``: the server clips each reply's update, then adds the noise.

    Flower's ``aggregate_train``, except that an update of norm 0 (a client that sends back
    the head it received) is left as it is: flwr 1.25's clipping divides by the norm."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        from .internals import differential_privacy

        dp = differential_privacy()

        replies = [m for m in replies if not m.has_error()]
        if not replies:
            return None, None
        self.num_sampled_clients = max(1, sum(P.reply_metrics(m.content)[P.NUM_EXAMPLES] > 0 for m in replies))
        self.clipped_to = self.clipping_norm
        current = self.current_arrays.to_numpy_ndarrays()
        for reply in replies:
            for name, record in reply.content.array_records.items():
                arrays = record.to_numpy_ndarrays()
                if dp.get_norm([a - c for a, c in zip(arrays, current, strict=True)]) > 0:
                    dp.compute_clip_model_update(param1=arrays, param2=current, clipping_norm=self.clipping_norm)
                reply.content[name] = ArrayRecord({k: Array(v) for k, v in zip(record.keys(), arrays, strict=True)})
        aggregated, measured = self.strategy.aggregate_train(server_round, replies)
        if aggregated:
            aggregated = self._add_noise_to_aggregated_arrays(aggregated)
        return aggregated, measured


class ClientSideFixedClipping(_FittedWrapper, DifferentialPrivacyClientSideFixedClipping):
    """``dp = "client-fixed"``: each client clips its own update (Flower's fixedclipping_mod);
    the server adds the noise (and the reply checks refuse an update longer than the norm)."""


class ClientSideAdaptiveClipping(_FittedWrapper, DifferentialPrivacyClientSideAdaptiveClipping):
    """``dp = "client-adaptive"``: clients clip to a norm the server adapts towards the median
    update norm (Andrew et al., 2021) from the clients' noisy clipped counts (``KEY_NORM_BIT``
    in their metrics, which the train config asks for: ``P.NORM_BIT``)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        config[P.NORM_BIT] = True
        return super().configure_train(server_round, arrays, config, grid)


def wrap(cfg, strategy, budget: Budget, num_nodes: int):
    """``strategy`` (one of config.DP_STRATEGIES, as RunConfig checked) inside the Flower DP
    wrapper ``cfg.dp`` names, with ``budget``'s noise multiplier, its mean made unweighted;
    ConfigError (one line) when client-adaptive samples too few clients for that noise."""
    strategy.uniform_weights = True
    sampled = sampled_per_round(num_nodes, cfg.fraction_train)
    z, c = budget.noise_multiplier, cfg.dp_clipping_norm
    if cfg.dp == "server-fixed":
        return ServerSideFixedClipping(strategy, z, c, sampled)
    if cfg.dp == "client-fixed":
        return ClientSideFixedClipping(strategy, z, c, sampled)
    if z >= 2 * sampled / 20:  # Flower's clipped-count noise (sampled / 20) must leave the heads some
        raise ConfigError(f"dp='client-adaptive' with noise multiplier {z:.4g} needs more than {math.ceil(10 * z)} "
                          f"clients a round (Flower splits the noise with the clipped-count query, whose share is "
                          f"clients/20); this federation samples {sampled}; accepted: dp='client-fixed' or "
                          f"'server-fixed', or a smaller noise multiplier")
    return ClientSideAdaptiveClipping(strategy, z, sampled, initial_clipping_norm=c)
