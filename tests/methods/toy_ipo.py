"""A training method from a file outside the package (docs/adding_a_method.md): IPO's squared
loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences") on DSPO's instance margins. Nothing in the package names it: the workflow loads it
from the config's ``method_files`` (tests/test_method_files.py)."""

import torch

from pipeline import losses
from pipeline.contracts import Method
from pipeline.training import step
from pipeline.training.offline import OfflineRun

#: IPO's regulariser: each instance's scaled margin is pulled towards 1 / (2 tau)
TAU = 0.5


def ipo_loss(err_theta, err_ref, masks, weights, winners, losers, config):
    """``sum_m w_m (h_m - 1 / (2 tau))^2``, ``h_m = -k beta d_m``, for one LQ (DSPO's ``d_m``:
    :func:`pipeline.losses.preference_margins`)."""
    margins, stats = losses.preference_margins(err_theta, err_ref, masks, weights, winners, losers)
    weights = torch.as_tensor(weights, dtype=margins.dtype, device=margins.device)
    scaled = -config.k * config.beta * margins
    return (weights * (scaled - 1.0 / (2.0 * TAU)) ** 2).sum(), stats


step.LOSSES["toy_ipo"] = ipo_loss
METHOD = Method("toy_ipo", "toy_ipo", "instance")


class ToyIpoRun(OfflineRun):
    """The offline loop as it is: only the loss differs."""


RUN = ToyIpoRun
