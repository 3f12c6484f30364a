"""Compiled CPU kernels, each with a pure-torch fallback where it cannot run."""
