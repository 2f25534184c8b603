"""Test-time-scaling evaluation: the sweep (``s1fast eval``), answer grading and the sample problem sets."""
