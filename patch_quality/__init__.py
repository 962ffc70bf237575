"""Self-supervised patch features and patch-quality maps for PatchDPO.

The official release does not ship these steps; see `patch_quality/README.md` for which parts follow
the paper and which are our choices. Modules: `layout` (data folder names), `store` (quality-map
file), `convert_pkl` (official pickle -> safetensors), `features`, `ssl_train`, `maps`, `visualize`,
`config` (their typed settings), `cli` (their parsers). The training pairs the maps describe are
made by `training_data.construct`.
"""
