"""Training data: sources of images (``sources``) and the batch loader
(``loader``)."""
