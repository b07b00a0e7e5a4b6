"""Distillation methods from the seed papers (docs/papers.md), each a loss or a training procedure
usable on any model. Import the submodule you need; nothing is imported here:

* :mod:`kdengine.methods.logit_limit` -- KD as logits matching, the T -> inf story (section 1)
* :mod:`kdengine.methods.tang` -- label smoothing, partial / class-similarity teachers and the
  gradient-rescaling diagnostic of Tang et al. (section 2)
* :mod:`kdengine.methods.london` -- Lipschitz-guided KD (section 4)
* :mod:`kdengine.methods.metadistil` -- meta-learned teacher (section 5)
* :mod:`kdengine.methods.iekd` -- inheritance and exploration KD (section 6)
"""
