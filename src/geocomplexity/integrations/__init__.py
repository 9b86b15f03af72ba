"""Where researchers already work: torchmetrics, Lightning and Ray.

Each submodule imports its framework, so install the matching extra first::

    pip install 'geocomplexity[torchmetrics]'   # integrations.torchmetrics
    pip install 'geocomplexity[lightning]'      # integrations.lightning
    pip install 'geocomplexity[ray]'            # --executor ray

``torch.distributed`` (torchrun, DDP) needs nothing extra:
:func:`geocomplexity.measure` merges across an initialized process group.
"""
