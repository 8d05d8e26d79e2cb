"""edge-runtime: on-device inference for portable ultrasound and X-ray scanners."""

__version__ = "0.1.0"
