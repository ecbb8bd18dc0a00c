"""Classic baselines: single device, list schedulers (greedy, HEFT, PEFT), METIS, the contiguous pipeline DP."""
