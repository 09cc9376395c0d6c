"""Input and output of chest X-rays: decoding files, preprocessing pixels, manifests and metadata.

Modules here know nothing of models or Ray; each is a set of small functions with its own tests.
"""
