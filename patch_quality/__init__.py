"""Self-supervised patch features and patch-quality maps for PatchDPO.

The official release ships neither step; see `patch_quality/README.md` for which parts follow the
paper and which are our choices. Modules: `layout` (data folder names), `store` (quality-map file),
`convert_pkl` (official pickle -> safetensors), `features`, `ssl_train`, `maps`, `visualize`. The
training pairs the maps describe are made by `training_data.construct`.
"""
