"""Training and inference methods from the breast-ultrasound literature, beyond binary segmentation.

- :mod:`busbench.methods.multiclass`: background / benign / malignant pixel labelling (Vallez et al. 2025).
- :mod:`busbench.methods.multitask`: joint segmentation and image classification with deterministic oversampling
  and prediction refinement (Aumente-Maestro et al. 2025).
- :mod:`busbench.methods.adversarial`: deep supervision with one discriminator per decoder stage (Li et al. 2023).

Submodules are imported explicitly by the parts that use them, so importing this package costs nothing.
"""
