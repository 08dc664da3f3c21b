"""SRD: Sharing Ratio Decomposition (Han, Kim, Kwak, ICLR 2024), generic over CNN graphs."""

from ierf.srd.explainer import SRD, Decomposition
from ierf.srd.rules import register_activation

__all__ = ["SRD", "Decomposition", "register_activation"]
