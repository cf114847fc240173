"""monailabel-evlf: an explainable medical vision-language model (EVLF-FM) in the MONAI Label loop."""

__version__ = "0.1.0"
