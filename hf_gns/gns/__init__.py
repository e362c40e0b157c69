"""Gradient noise scale math: the estimator, its calibration, units of the synchronized gradient, groups."""

from .calibration import CALIBRATION_GROUPS, GNSCalibration
from .estimator import GNSEstimator, per_example_statistic
from .groups import clean_name, membership_matrix, parameter_groups
from .units import SyncedStatistics, to_synced_units

__all__ = [
    "CALIBRATION_GROUPS",
    "GNSCalibration",
    "GNSEstimator",
    "SyncedStatistics",
    "clean_name",
    "membership_matrix",
    "parameter_groups",
    "per_example_statistic",
    "to_synced_units",
]
