"""Exit adapters and threshold calibration: ``octomil calibrate`` and ``octomil eval``."""
