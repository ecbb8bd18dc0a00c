"""Exact placement and scheduling with OR-Tools CP-SAT."""
