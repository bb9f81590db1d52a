"""The evaluation's concept-basis methods: one registered :class:`~gig.evaluation.bases.ConceptBasis`
subclass per module. Every module here is imported the first time the registry is read
(:func:`gig.evaluation.bases.registered`), so a new method is a new module with one class
decorated with :func:`~gig.evaluation.bases.register_basis`, plus its test.

=========================  =======================  ===========================================
name                       module                   basis
=========================  =======================  ===========================================
``ours``                   :mod:`.ours`             the run's dictionary and its stored Lasso codes
``dictionary``             :mod:`.dictionary`       scikit-learn dictionary learning + the run's coder
``sae``                    :mod:`.overcomplete_sae` Overcomplete's TopK SAE (optional extra)
``sae-torch``              :mod:`.sae`              TopK sparse autoencoder (torch, hand-written)
``kmeans``                 :mod:`.kmeans`           k-means centroids, hard nearest-centroid code
``nmf``                    :mod:`.nmf`              scikit-learn NMF (non-negative layers only)
``user:PATH``              :mod:`.user`             a basis of the user's own from safetensors
=========================  =======================  ===========================================
"""
