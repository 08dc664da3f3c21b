"""Proof of fidelity: evaluation material the project generates itself, and the experiments on it.

* :mod:`ierf.fidelity.synthetic` - seeded "digits on real textures" localisation set with boxes/masks;
* :mod:`ierf.fidelity.tiny_resnet` - the small ResNet trained on it (checkpoint in ``assets/``);
* :mod:`ierf.fidelity.grid` - 2x2 grids of real photos for the grid pointing game (EfficientNet-Lite0);
* :mod:`ierf.fidelity.apop` - activation-pattern-only prediction;
* targeted explanation manipulation (Dombrowski et al. 2019) lives with the other metrics, in
  :mod:`ierf.metrics.manipulation`.

Heavy submodules are imported on use; nothing here imports :mod:`ierf.serving`.
"""
