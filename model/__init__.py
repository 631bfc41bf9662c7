"""monet-cyclegan model layer: networks, weight files and the batched translator."""
