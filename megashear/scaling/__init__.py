"""Scaling laws of pruned models: pure numpy / scipy maths, no torch, no megatron.

- :mod:`megashear.scaling.p2_law`: the P² law of post-training after pruning (Chen et al.,
  arXiv 2411.10272), its robust fit, predictions and token budgets;
- :mod:`megashear.scaling.p2_points`: the fit and query tables (CSV / JSON) and their checks;
- :mod:`megashear.scaling.p2_plot`: observed curves, fit and extrapolation as a PNG;
- :mod:`megashear.scaling.p2_config`: the ``megashear fit-p2`` settings.
"""
