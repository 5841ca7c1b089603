"""Attacks on what data-parallel training reveals: gradient inversion and membership inference."""
