"""The shared layer: atomic I/O, stable seeds, the bad-input error, image loading, training-state folders.

It imports no diffusers (nor transformers), so every package and script can use it cheaply.
"""
