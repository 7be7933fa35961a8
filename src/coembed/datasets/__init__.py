"""Dataset builders: they write folders of pictures and CSVs that training and evaluation read.

``coembed.datasets.synthetic`` draws the captioned synthetic pictures shipped in data/synthetic
(and the zero-shot folder in data/shapes); ``coembed.datasets.icons`` builds the cross-theme
retrieval set from installed icon themes. Nothing here is on the path a picture takes through
training or search (that is ``coembed.data``); this package imports nothing so ``import coembed``
stays cheap.
"""
