"""The training objectives by the name `--model` takes: the one registry of this extension point.

An objective is a class with ``loss_names`` (what ``step`` returns, in order), ``d_loss_names`` (which of them
are the discriminators'), ``check(cfg)`` (its own option rules, raising ConfigError), ``step``, ``state_dict``,
``load_state_dict`` and ``sample_grid``; ``nets`` holds its networks (training/parts.py). A new objective is
its own module and a line here (docs/architecture.md).
"""
from __future__ import annotations

from training.cut import CUT
from training.cyclegan import CycleGAN

OBJECTIVES = {"cyclegan": CycleGAN, "cut": CUT, "fastcut": CUT}
