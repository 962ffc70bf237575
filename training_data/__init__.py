"""PatchDPO's training pairs: clean-background references and IP-Adapter-Plus generations of them.

The official release does not ship this step; see `training_data/README.md` for which parts follow
the paper and which are our choices. Modules: `categories` (objects, prompt templates), `construct`
(the pairs, `python -m training_data.construct`), `config` (its typed settings), `cli` (its parser).
"""
