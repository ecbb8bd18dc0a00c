"""The machine model, every rule once: op times, transfer times and routes, memory peaks, the evaluator, schedule replay."""
