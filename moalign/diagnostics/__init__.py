"""Diagnostics: the covariance law monitor, cross-objective interference, μ-PL and Pareto metrics.

Import the modules themselves (``from moalign.diagnostics import interference``); this file stays empty so that
importing the package can never fail.
"""
