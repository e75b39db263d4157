"""Evaluation: control fidelity (edge IoU / F1, as in the OFT paper)."""
