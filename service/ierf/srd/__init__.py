"""SRD: Sharing Ratio Decomposition (Han, Kim, Kwak, ICLR 2024), generic over CNN graphs."""

from ierf.srd.explainer import SRD, Decomposition, StateLayout, pfv_grid
from ierf.srd.rules import register_activation

__all__ = ["SRD", "Decomposition", "StateLayout", "pfv_grid", "register_activation"]
