"""The streaming engine: whole models, parameter by parameter, around the rules of
:mod:`mergelab.merging`.

``checkpoints`` reads safetensors lazily and writes them streamed and atomically;
``pool`` checks θ0 and the fine-tuned models and reads their task vectors block by block;
``workspace`` holds reused buffers and the threads that share blocks; ``streaming`` turns
a merged task vector into models; ``task_arithmetic``, ``trust_region`` (with the exact
threshold selection of ``conflict_selection``), ``tall_masks`` (the TALL file format, its
build and retrieval), ``ties`` and ``consensus`` are the methods over whole models.
"""
