"""The paper's first version: a corpus prior over the teacher's next tokens, and its posterior through the proxy.

`build_prior` (`proxykd prior`) counts the teacher's tokens into a back-off n-gram index; `precompute
--prior DIR` turns it, with the proxy, into top-k targets that `distill` reads unchanged.
"""

from .build import PriorConfig, build_prior, load_prior
from .ngram import NGramPrior
from .posterior import POSTERIORS, Posterior

__all__ = ["POSTERIORS", "NGramPrior", "Posterior", "PriorConfig", "build_prior", "load_prior"]
