"""Automatic topology choice: profiles per topology, moving-window observations, the decision rules, and the
daemon-side runner and profile sweep. Nothing here imports torch."""
