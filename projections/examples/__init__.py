"""Example user projections shipped with Runbus."""
