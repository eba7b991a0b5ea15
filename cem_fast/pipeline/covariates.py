"""Control variates of a run's draws: each drawn patch's brightness and colour explain much of a block's effect,
and their mean over the bank is known exactly (draws are uniform over it), so a regression on them removes that
part of the noise (:func:`cem_fast.intervals.block_estimates`; how much it removes is measured in
benchmarks/results/)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..options import intervention_ids
from .draws import patch_indices


def covariate_table(bank_in: torch.Tensor) -> np.ndarray:
    """(P, q) the control variates of each patch of the bank (as pasted into the input): its mean per channel,
    centred on the mean over the bank, reduced to independent columns (a grey bank's three equal channel means
    are one covariate, not a singular fit; the rotation onto the principal directions leaves the intercept and
    its HC3 error unchanged)."""
    bank = bank_in.detach().to("cpu", torch.float64)
    means = bank.mean(dim=tuple(range(2, bank.dim()))).numpy()
    means = means - means.mean(axis=0)
    _, sv, vt = np.linalg.svd(means, full_matrices=False)
    return means @ vt[:int((sv > 1e-9 * max(sv.max(initial=0.0), 1e-300)).sum())].T


def draw_covariates(table: np.ndarray, seed: int, blocks: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(B, K, q) the covariates of draws ``draws`` (B, K) of ``blocks`` (B,): the rows of ``table`` of the patches
    those draws use (keyed by (seed, block, draw), as the runner draws them)."""
    ids = intervention_ids(np.asarray(blocks, np.int64)[:, None], np.asarray(draws, np.int64))
    pidx = patch_indices(seed, torch.from_numpy(ids.reshape(-1)), len(table)).numpy()
    return table[pidx].reshape(ids.shape + (table.shape[1],))


def patch_covariates(plan) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The control variates of a run's draws (:func:`covariate_table`, the module docstring says why). The table
    is kept as ``.table`` (results carry it, for compare)."""
    table = covariate_table(plan.bank_in)

    def covariates(blocks: np.ndarray, draws: np.ndarray) -> np.ndarray:
        return draw_covariates(table, plan.seed, blocks, draws)
    covariates.table = table
    return covariates
