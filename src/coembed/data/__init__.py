"""The data layer: dataset formats, robust image decoding, transforms, the decoded-image cache
and training batches (the builders of example datasets live in ``coembed.datasets``).

Import from the submodules (``coembed.data.formats``, ``.images``, ``.transforms``, ``.cache``,
``.loader``); this package imports nothing so ``import coembed`` stays cheap.
"""
