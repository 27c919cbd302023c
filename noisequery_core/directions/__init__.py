"""NoiseCLR directions: prompt-free editing directions learned contrastively from unlabeled images.

Modules: ``noiseclr`` (loss, training loop with resume, the directions file format).
"""
