"""Gradient noise scale math: the estimator, units of the synchronized gradient, parameter groups."""

from .estimator import GNSEstimator, per_example_statistic
from .groups import clean_name, membership_matrix, parameter_groups
from .units import SyncedStatistics, to_synced_units

__all__ = [
    "GNSEstimator",
    "SyncedStatistics",
    "clean_name",
    "membership_matrix",
    "parameter_groups",
    "per_example_statistic",
    "to_synced_units",
]
