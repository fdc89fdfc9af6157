"""Experiment harnesses: one folder per family of the paper's evidence (``lm/`` pre-training, ``spike_demo/``),
each a small package on the shared parts in ``harness/``. They import the library; the library never imports
them. A family's ``commands.py`` lists its ``spamopt`` commands."""
