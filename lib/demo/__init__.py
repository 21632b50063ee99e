"""The embedded demo dataset (operations): generated stick-figure photos of the 15 actions, for offline runs."""
