"""The symmetry solver: repeated blocks on identical devices, a reduced DP, a polish on the full problem."""
