"""Lower bounds: numbers no plan can beat, for both objectives (:func:`partitioner.bounds.lower.lower_bound`)."""
