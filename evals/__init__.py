"""Evaluations: bits per byte, CORE and ChatCORE. Not written yet: they arrive with the evals issue."""
