"""Graph transforms: coarsening (fusion rules, merges) and mapping coarse plans back to every node."""
