"""Measuring what routing does: specialisation and load statistics."""
from moejax.analysis.specialization import joint_counts, mutual_information

__all__ = ["joint_counts", "mutual_information"]
