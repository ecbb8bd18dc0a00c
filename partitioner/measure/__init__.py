"""Measured costs: profiling local devices, calibration of a spec, the hand-off probe, predicted vs measured fidelity."""
