"""dlforge.vision: the networks, image handling and bundled data sets every ML stage shares."""
