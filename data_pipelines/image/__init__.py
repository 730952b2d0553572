"""Image-text data: prepare-image-text, make-synthetic-image-text, transforms and the streaming loader."""
