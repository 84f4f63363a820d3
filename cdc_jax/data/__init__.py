"""Training data: sources of images (``sources``), which files are usable
(``screen``: skip warnings and the summary) and the batch loader
(``loader``)."""
