"""Input data: sources, preprocessing, order."""
