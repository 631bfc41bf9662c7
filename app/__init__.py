"""monet-cyclegan web service."""
