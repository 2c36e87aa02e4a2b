"""Data a run reads: text and token files, tokenizers, images, image-text rows, built-in sets."""
