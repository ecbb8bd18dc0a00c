"""Exact MILP solvers (PuLP/CBC, HiGHS) for latency and throughput."""
