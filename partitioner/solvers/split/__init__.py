"""The modularity-based splitting heuristic (after DiviML, Ghannane and Abdelfattah, ICCAD 2023)."""
