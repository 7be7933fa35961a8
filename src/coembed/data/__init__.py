"""The data layer: dataset formats, robust image decoding, transforms, the decoded-image cache,
training batches and the synthetic example data.

Import from the submodules (``coembed.data.formats``, ``.images``, ``.transforms``, ``.cache``,
``.loader``, ``.synthetic``); this package imports nothing so ``import coembed`` stays cheap.
"""
