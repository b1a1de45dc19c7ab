"""sockpolicy."""
