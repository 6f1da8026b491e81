"""dlforge.labeler: the first stage of the pipeline.

Ingests a folder or zip of images (``POST /datasets``), embeds every image with a pretrained
backbone, indexes the embeddings for similar-image search and runs the active-learning loop:
people (or the clearly named *simulated* annotator) label the batches it asks for, a calibrated
classifier on the embeddings labels the rest, and ``dataset.labeled`` carries the labeled manifest.
"""
