"""Consensus merging (Wang et al., ICML 2024): θ = θ0 + α·(mcons ⊙ τMTL), keeping the
coordinates that at least k tasks' TALL masks keep."""

from __future__ import annotations

from mergelab.engine.streaming import as_factor_list
from mergelab.engine.tall_masks import check_consensus_k, check_ties, checked_lambdas
from mergelab.methods.base import MergeContext, MergeMethod, Variants, scaled_variants
from mergelab.methods.tall_masks import build_masks


class Consensus(MergeMethod):
    """θ = θ0 + α·(mcons ⊙ τMTL), mcons = 1{Σt mt ≥ k}.

    Args:
        k: keep the coordinates that at least k tasks' masks keep (k = 0: all, plain Task
            Arithmetic on τMTL; k > the number of tasks: none, the pretrained model).
        scaling_factor: α; a list scores every value and picks on validation when the data
            module's test_splits has ``val``.
        tall_lambda: the TALL λ of every task's mask.
        ties: the share each task keeps in a TIES-merged τMTL; null for τMTL = Σ τt.
    """

    min_tasks = 2

    def __init__(
        self,
        k: int = 2,
        scaling_factor: float | list[float] = 0.3,
        tall_lambda: float = 0.6,
        ties: float | None = None,
    ):
        check_consensus_k(k)
        checked_lambdas([tall_lambda])
        check_ties(ties)
        self.k = k
        self.scaling_factor = as_factor_list(scaling_factor, "scaling_factor")
        self.tall_lambda = tall_lambda
        self.ties = ties

    def variants(self, context: MergeContext) -> Variants:
        pool = context.pool()
        masks = build_masks(pool, [self.tall_lambda], self.ties, context)
        fixed = dict.fromkeys(masks.tasks, self.tall_lambda)
        delta_of = masks.consensus_delta_fn(self.k, fixed)
        return scaled_variants(
            self.name, pool.pretrained, masks.shapes, delta_of, self.scaling_factor
        )
