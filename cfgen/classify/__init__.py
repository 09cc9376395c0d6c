"""The attribute classifier: the instrument every effectiveness, minimality and realism figure is read off.

`labels` turns manifest metadata into masked targets, `network` is the model (a MONAI DenseNet with one head per
attribute), `train` fits it on Ray Train, `calibrate` sets per-attribute temperatures on the validate split,
`evaluate` reports held-out AUROC with bootstrap CIs and the age MAE, `store` saves and loads it as a folder.
"""
