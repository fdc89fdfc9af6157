"""Experiment harnesses. They import the optimizer library; the library never imports them."""
