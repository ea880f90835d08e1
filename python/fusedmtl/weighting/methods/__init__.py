"""One module per weighting method (or small family); the machinery they share is one level up."""
