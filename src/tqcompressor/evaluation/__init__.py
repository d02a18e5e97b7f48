"""Evaluation: perplexity, fidelity to the teacher, speed and memory, reports and figures."""
