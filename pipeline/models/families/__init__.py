"""One module per backbone family, each a few functions registered with `register_backbone`.

The registry imports every module here by discovery (no list of them anywhere), so adding a
family is adding a file, and dvc.yaml makes each backbone's stages depend on its own file
alone (params.yaml's `backbones.<name>.family`).
"""
