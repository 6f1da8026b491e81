"""dlforge trainer: runs HPO trials and the final training of the proposed model.

Training only runs the unfrozen tail of the network: the frozen prefix's output for every image is
computed once (ONNX Runtime by default) and cached in the object store under ``trainer/cache/``.
``no_of_workers=N`` trains on N data-parallel processes (PyTorch DDP; Horovod as an optional engine).
"""
