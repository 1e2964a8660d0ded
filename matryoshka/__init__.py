"""Fused all-prefix Matryoshka sparse-autoencoder loss.

>>> from matryoshka import Prefixes, SparseActs, matryoshka_loss, MatryoshkaLoss
"""

from .loss import MatryoshkaLoss, MatryoshkaLossOutput, matryoshka_loss
from .prefixes import Prefixes
from .reference import matryoshka_loss_reference
from .sparse_acts import SparseActs

__all__ = [
    "MatryoshkaLoss",
    "MatryoshkaLossOutput",
    "Prefixes",
    "SparseActs",
    "matryoshka_loss",
    "matryoshka_loss_reference",
]
__version__ = "0.1.0"
