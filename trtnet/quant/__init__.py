"""INT8: calibration (histograms → amax), the calibration file, Q/DQ plans, the legacy calibrator."""
