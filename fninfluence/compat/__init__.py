"""Compatibility layers that let code written for other influence libraries run on fninfluence.

* :mod:`fninfluence.compat.kronfluence`: Kronfluence 1.0.1's ``Analyzer``, ``prepare_model``,
  ``FactorArguments``, ``ScoreArguments``, ``Task`` and ``DataLoaderKwargs``, as a thin shell over
  :func:`fninfluence.fit_factors`, :func:`fninfluence.pairwise_scores` and :func:`fninfluence.self_scores`.
  A Kronfluence script runs after changing only its imports; see docs/migrating-from-kronfluence.md.
"""

__all__ = ["kronfluence"]
