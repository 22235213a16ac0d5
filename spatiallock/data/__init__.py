"""Layout data: the synthetic benchmark domain and COCO-format layout loading.

- `synth`, `shapes`, `captions`: draw the synthetic shapes domain and write it in the COCO 2017 formats.
- `cocofile`: read COCO-format JSON with clear errors, index usable images, count what is skipped.
- `coco`, `transforms`: `LayoutDataset` (resize, crop, flip with boxes) and `collate_layouts`.
- `show`, `commands`: the `spatiallock data synth` and `spatiallock data show` commands.
"""
