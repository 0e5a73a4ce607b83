"""The search system: space files, trials, tracking and the Ray Tune runner."""
